//! The bare broker loop: what the worker does on the broker and nothing else.
//! Consume with prefetch C, one task per delivery (at most C at once), publish a
//! small result with a publisher confirm awaited per message, then ack. No
//! database, no HTTP, no JSON decoding of the job. It runs as its own process
//! (`bench bare-consumer`), so its CPU time and memory are measured as the
//! worker's are.

use std::io::Write as _;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use futures_util::StreamExt as _;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use mail_dispatch_broker::{Broker, Outgoing, json_properties};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(clap::Args, Debug, Clone)]
pub struct BareArgs {
    #[arg(long)]
    pub amqp_url: String,
    /// Queue to consume.
    #[arg(long)]
    pub queue: String,
    /// Exchange results are published to (routing key `result.sent`).
    #[arg(long)]
    pub results_exchange: String,
    #[arg(long)]
    pub concurrency: usize,
}

/// Runs until SIGTERM. Prints `ready` on stdout once it consumes.
pub async fn consume(args: BareArgs) -> anyhow::Result<()> {
    let broker = Broker::connect(&args.amqp_url, "mail-dispatch-bench-bare")
        .await
        .context("connecting to RabbitMQ")?;
    let prefetch = u16::try_from(args.concurrency).unwrap_or(u16::MAX).max(1);
    let (_channel, mut consumer) = broker
        .consume(&args.queue, prefetch, "mail-dispatch-bench-bare")
        .await
        .context("consuming the bare jobs queue")?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    println!("ready");
    std::io::stdout().flush()?;
    let slots = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let exchange: Arc<str> = args.results_exchange.into();
    loop {
        tokio::select! {
            _ = term.recv() => break,
            next = consumer.next() => match next {
                Some(Ok(delivery)) => {
                    let permit = slots.clone().acquire_owned().await.expect("never closed");
                    tokio::spawn(process(broker.clone(), exchange.clone(), delivery, permit));
                }
                Some(Err(e)) => bail!("consumer failed: {e}"),
                None => bail!("consumer closed"),
            }
        }
    }
    broker.close().await;
    Ok(())
}

async fn process(
    broker: Broker,
    exchange: Arc<str>,
    delivery: Delivery,
    _slot: OwnedSemaphorePermit,
) {
    let id = delivery
        .properties
        .message_id()
        .as_ref()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_default();
    let now = chrono::Utc::now();
    let body = serde_json::json!({
        "job_id": id,
        "status": "sent",
        "provider": "bare",
        "attempts": 1,
        "completed_at": now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    });
    let body = serde_json::to_vec(&body).expect("serializable");
    let published = broker
        .publish(Outgoing {
            exchange: &exchange,
            routing_key: "result.sent",
            body: &body,
            properties: json_properties()
                .with_message_id(id.as_str().into())
                .with_timestamp(now.timestamp() as u64),
            mandatory: false,
        })
        .await;
    let _ = match published {
        Ok(()) => delivery.ack(BasicAckOptions::default()).await,
        Err(_) => {
            delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                })
                .await
        }
    };
}
