#![doc = include_str!("../README.md")]

mod intake;
mod topology;

use std::time::Duration;

use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer};

pub use intake::{BodyCharge, BoundedConsumer, MemoryBudget, WORKING_COPIES};
pub use lapin;
pub use topology::Topology;

/// Errors of the broker. `is_connection_lost` tells the caller to reconnect.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    #[error("AMQP error: {0}")]
    Amqp(#[from] lapin::Error),
    /// The broker refused to store the message (basic.nack).
    #[error("broker refused the message (nack)")]
    Nacked,
    /// A mandatory message could not be routed to any queue.
    #[error("message unroutable: {0}")]
    Returned(String),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The message went to the broker, but its confirm never came back (the
    /// connection or channel closed first): it may or may not have been routed.
    #[error("no confirm for a published message: {0}")]
    Unconfirmed(lapin::Error),
    /// The consumer's in-process relay could not be set up.
    #[error("AMQP relay: {0}")]
    Relay(String),
}

impl BrokerError {
    /// Whether the message may have reached its queues although the publish
    /// failed: it was handed to the broker and its confirm did not come back.
    pub fn maybe_delivered(&self) -> bool {
        matches!(self, BrokerError::Unconfirmed(_) | BrokerError::Timeout(_))
    }
}

/// An open connection with a confirm-mode channel for publishing.
#[derive(Clone)]
pub struct Broker {
    connection: std::sync::Arc<Connection>,
    publisher: Channel,
    confirm_timeout: Duration,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").finish_non_exhaustive()
    }
}

/// A message to publish.
#[derive(Debug, Clone)]
pub struct Outgoing<'a> {
    pub exchange: &'a str,
    pub routing_key: &'a str,
    pub body: &'a [u8],
    pub properties: BasicProperties,
    /// Fail when no queue receives the message (for our own queues: delay, dead letters).
    pub mandatory: bool,
}

/// Headers mail-dispatch puts on delayed and dead-lettered copies of a job: part of
/// the wire contract (operators and `dead-letters list` read them).
pub mod headers {
    /// Send attempts made so far.
    pub const ATTEMPTS: &str = "x-mail-dispatch-attempts";
    /// When the job was first seen, milliseconds since the Unix epoch.
    pub const FIRST_SEEN: &str = "x-mail-dispatch-first-seen";
    /// Not to be attempted before, milliseconds since the Unix epoch.
    pub const NOT_BEFORE: &str = "x-mail-dispatch-not-before";
    /// Earlier failed attempts, e.g. `#1 10:15:03 provider_unavailable 503; …`.
    pub const HISTORY: &str = "x-mail-dispatch-history";
    /// Why a job was dead-lettered: a contract error code.
    pub const REASON: &str = "x-mail-dispatch-reason";
    /// Human-readable detail of the dead-letter reason.
    pub const DETAIL: &str = "x-mail-dispatch-detail";
    /// The job id, when readable.
    pub const JOB_ID: &str = "x-mail-dispatch-job-id";
    /// When it was dead-lettered, RFC 3339.
    pub const DEAD_AT: &str = "x-mail-dispatch-dead-at";
}

/// Properties of a persistent JSON message.
pub fn json_properties() -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(ShortString::from("application/json"))
}

/// Reads a header as text (string headers) or as a number rendered as text.
pub fn header_str(properties: &BasicProperties, name: &str) -> Option<String> {
    let headers = properties.headers().as_ref()?;
    match headers.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        AMQPValue::LongLongInt(n) => Some(n.to_string()),
        AMQPValue::LongInt(n) => Some(n.to_string()),
        AMQPValue::LongUInt(n) => Some(n.to_string()),
        AMQPValue::ShortInt(n) => Some(n.to_string()),
        AMQPValue::Timestamp(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Reads an integer header.
pub fn header_i64(properties: &BasicProperties, name: &str) -> Option<i64> {
    header_str(properties, name)?.parse().ok()
}

/// Adds string headers to a table.
pub fn with_headers(mut table: FieldTable, headers: &[(&str, String)]) -> FieldTable {
    for (k, v) in headers {
        table.insert(
            ShortString::from(*k),
            AMQPValue::LongString(v.clone().into()),
        );
    }
    table
}

impl Broker {
    /// Connects and opens the confirm-mode publishing channel.
    pub async fn connect(url: &str, connection_name: &str) -> Result<Self, BrokerError> {
        let properties =
            ConnectionProperties::default().with_connection_name(connection_name.into());
        let connection = Connection::connect(url, properties).await?;
        let publisher = connection.create_channel().await?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Broker {
            connection: std::sync::Arc::new(connection),
            publisher,
            confirm_timeout: Duration::from_secs(30),
        })
    }

    /// Whether the connection and publishing channel are open (for `/readyz`).
    pub fn is_connected(&self) -> bool {
        self.connection.status().connected() && self.publisher.status().connected()
    }

    /// Declares the whole topology (idempotent).
    pub async fn declare(&self, topology: &Topology) -> Result<(), BrokerError> {
        // The dead-letter queue is declared (classic, durable) on a throw-away
        // channel: an existing one of another type or with other arguments answers
        // PRECONDITION_FAILED, which closes that channel only, and is used as it is.
        // (A passive declare would close the channel of a healthy first start with
        // NOT_FOUND, which lapin logs as an error.)
        let probe = self.connection.create_channel().await?;
        match probe
            .queue_declare(
                topology.dead_queue.as_str().into(),
                lapin::options::QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
        {
            Ok(_) => {
                let _ = probe.close(200, "declared".into()).await;
            }
            Err(e) => {
                tracing::info!(queue = %topology.dead_queue, error = %e, "dead-letter queue exists with other settings; used as it is");
            }
        }
        let dead_exists = true;
        topology.declare(&self.publisher, dead_exists).await
    }

    /// A new channel (for consumers or one-off reads).
    pub async fn channel(&self) -> Result<Channel, BrokerError> {
        Ok(self.connection.create_channel().await?)
    }

    /// Starts consuming `queue` on a dedicated channel with manual acks and `prefetch`.
    pub async fn consume(
        &self,
        queue: &str,
        prefetch: u16,
        tag: &str,
    ) -> Result<(Channel, Consumer), BrokerError> {
        let channel = self.connection.create_channel().await?;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let consumer = channel
            .basic_consume(
                queue.into(),
                tag.into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok((channel, consumer))
    }

    /// Publishes and waits for the broker's confirm. Succeeds only on an ack
    /// (and, for a mandatory message, only if it was routed).
    pub async fn publish(&self, message: Outgoing<'_>) -> Result<(), BrokerError> {
        let confirm = self
            .publisher
            .basic_publish(
                message.exchange.into(),
                message.routing_key.into(),
                BasicPublishOptions {
                    mandatory: message.mandatory,
                    ..BasicPublishOptions::default()
                },
                message.body,
                message.properties,
            )
            .await?;
        let confirmation = tokio::time::timeout(self.confirm_timeout, confirm)
            .await
            .map_err(|_| BrokerError::Timeout(self.confirm_timeout))?
            .map_err(BrokerError::Unconfirmed)?;
        match confirmation {
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
            Confirmation::Ack(Some(returned)) => {
                Err(BrokerError::Returned(returned.reply_text.to_string()))
            }
            Confirmation::Nack(_) => Err(BrokerError::Nacked),
        }
    }

    /// Closes the connection politely.
    pub async fn close(&self) {
        if self.connection.status().connected() {
            let _ = self.publisher.close(200, "bye".into()).await;
            let _ = self.connection.close(200, "bye".into()).await;
        }
    }
}
