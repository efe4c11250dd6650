//! The consume loop: connect, declare, consume; each delivery becomes a task that
//! asks the dispatcher for a decision and applies it. A delivery is acked only
//! after what the decision publishes is confirmed by the broker.
//!
//! Lifecycle:
//! - The connection is re-established with backoff whenever it drops. Tasks of a
//!   dead channel finish their work, but their acks fail: those deliveries come
//!   back redelivered and the ledger turns them into a re-publish or a no-op.
//! - Shutdown (the token is cancelled): the consumer is cancelled, in-flight jobs
//!   get `shutdown_grace` to finish, then the rest are handed back (nack + requeue),
//!   and the connection is closed, which also returns anything still prefetched.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use futures_util::StreamExt as _;
use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicNackOptions};
use lapin::types::{FieldTable, ShortString};
use mail_dispatch_broker::{
    Broker, BrokerError, Outgoing, header_i64, header_str, headers, json_properties, with_headers,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::dispatch::{Decision, Dispatcher, Finish, Incoming};
use crate::health::Health;

/// Runs the worker until `shutdown` is cancelled and in-flight work is settled.
pub async fn run(dispatcher: Arc<Dispatcher>, health: Arc<Health>, shutdown: CancellationToken) {
    let config = &dispatcher.config;
    let tracker = TaskTracker::new();
    let hard_stop = CancellationToken::new();
    let mut backoff = Duration::from_millis(200);
    let mut last: Option<(Broker, lapin::Channel)> = None;

    'connection: while !shutdown.is_cancelled() {
        let connected = tokio::select! {
            r = connect(config) => r,
            () = shutdown.cancelled() => break,
        };
        let (broker, channel, mut consumer) = match connected {
            Ok(c) => c,
            Err(e) => {
                health.set_amqp(false);
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "AMQP connection failed");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = shutdown.cancelled() => break,
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        backoff = Duration::from_millis(200);
        health.set_amqp(true);
        tracing::info!(queue = %config.topology.jobs_queue, concurrency = config.concurrency, "consuming");
        let slots = Arc::new(Semaphore::new(config.concurrency.max(1)));
        loop {
            tokio::select! {
                            biased;
                            () = shutdown.cancelled() => {
            let _ = channel.basic_cancel(consumer.tag(), BasicCancelOptions::default()).await;
                                // The channel stays open: in-flight jobs still ack on it.
                                last = Some((broker.clone(), channel.clone()));
                                break 'connection;
                            }
                            next = consumer.next() => match next {
                                Some(Ok(delivery)) => {
                                    let permit = slots.clone().acquire_owned().await.expect("semaphore never closed");
                                    tracker.spawn(process(dispatcher.clone(), broker.clone(), delivery, permit, hard_stop.clone()));
                                }
                                Some(Err(e)) => {
                                    tracing::warn!(error = %e, "AMQP consumer failed; reconnecting");
                                    break;
                                }
                                None => {
                                    tracing::warn!("AMQP consumer closed; reconnecting");
                                    break;
                                }
                            }
                        }
        }
        health.set_amqp(false);
        broker.close().await;
    }

    tracker.close();
    if tokio::time::timeout(config.shutdown_grace, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            in_flight = tracker.len(),
            "shutdown grace period over; handing remaining jobs back"
        );
        hard_stop.cancel();
        tracker.wait().await;
    }
    if let Some((broker, channel)) = last {
        // Closing the consumer channel returns anything still prefetched; closed
        // explicitly (not on drop) so the connection's close does not race it.
        let _ = channel.close(200, "shutdown".into()).await;
        broker.close().await;
    }
    health.set_amqp(false);
    dispatcher.published.flush(&dispatcher.services.store).await;
    tracing::info!("worker stopped");
}

async fn connect(
    config: &crate::WorkerConfig,
) -> Result<(Broker, lapin::Channel, lapin::Consumer), BrokerError> {
    let broker = Broker::connect(&config.amqp_url, &config.instance).await?;
    broker.declare(&config.topology).await?;
    let prefetch = u16::try_from(config.concurrency).unwrap_or(u16::MAX).max(1);
    let (channel, consumer) = broker
        .consume(&config.topology.jobs_queue, prefetch, &config.instance)
        .await?;
    Ok((broker, channel, consumer))
}

fn millis_to_time(ms: i64) -> Option<DateTime<Utc>> {
    Utc.timestamp_millis_opt(ms).single()
}

/// Reads what the dispatcher needs from a delivery.
pub fn incoming_from(delivery: &Delivery) -> Incoming {
    let p = &delivery.properties;
    let published = p
        .timestamp()
        .and_then(|secs| Utc.timestamp_opt(secs as i64, 0).single());
    Incoming {
        body: delivery.data.clone(),
        message_id: p.message_id().as_ref().map(|m| m.as_str().to_owned()),
        attempts: header_i64(p, headers::ATTEMPTS)
            .unwrap_or(0)
            .clamp(0, u32::MAX as i64) as u32,
        first_seen: header_i64(p, headers::FIRST_SEEN)
            .and_then(millis_to_time)
            .or(published)
            .unwrap_or_else(Utc::now),
        not_before: header_i64(p, headers::NOT_BEFORE).and_then(millis_to_time),
        history: header_str(p, headers::HISTORY).unwrap_or_default(),
    }
}

async fn process(
    dispatcher: Arc<Dispatcher>,
    broker: Broker,
    delivery: Delivery,
    _slot: OwnedSemaphorePermit,
    hard_stop: CancellationToken,
) {
    metrics::gauge!(crate::metrics::JOBS_IN_FLIGHT).increment(1.0);
    metrics::counter!(crate::metrics::JOBS_RECEIVED).increment(1);
    let incoming = incoming_from(&delivery);
    // One span for the whole delivery, from receipt to ack: the dispatcher fills in
    // the job's fields once it has decoded it, so publish and ack failures carry them.
    let span = tracing::info_span!(
        "job",
        job.id = tracing::field::Empty,
        org.id = tracing::field::Empty,
        category = tracing::field::Empty,
        provider = tracing::field::Empty,
        attempt = incoming.attempts + 1,
        delivery_tag = delivery.delivery_tag,
    );
    settle(dispatcher, broker, delivery, incoming, hard_stop)
        .instrument(span)
        .await;
    metrics::gauge!(crate::metrics::JOBS_IN_FLIGHT).decrement(1.0);
}

/// Decides, publishes what the decision calls for, then acks (or hands back).
async fn settle(
    dispatcher: Arc<Dispatcher>,
    broker: Broker,
    delivery: Delivery,
    incoming: Incoming,
    hard_stop: CancellationToken,
) {
    let work = async {
        let decision = dispatcher.handle(&incoming).await;
        let publishing = match &decision {
            Decision::Finish(f) => f.ledger_key.clone(),
            _ => None,
        };
        let applied = apply(&dispatcher, &broker, &delivery, &incoming, decision).await;
        if applied.is_err()
            && let Some(key) = publishing
        {
            // The redelivery of this job publishes the recorded result right away.
            let _ = dispatcher.services.store.release_publish(&key).await;
        }
        applied
    };
    let outcome = tokio::select! {
        r = work => Some(r),
        () = hard_stop.cancelled() => None,
    };
    match outcome {
        Some(Ok(())) => {
            if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
                // The channel died: the delivery comes back and the ledger settles it.
                tracing::warn!(error = %e, "ack failed; the job will be redelivered");
            }
        }
        Some(Err(e)) => {
            tracing::warn!(error = %e, "could not publish the outcome; handing the job back");
            let _ = delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                })
                .await;
        }
        None => {
            tracing::warn!("shutdown grace period over; handing the job back");
            let _ = delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                })
                .await;
        }
    }
}

/// Publishes what a decision calls for, each with a broker confirm.
pub async fn apply(
    dispatcher: &Dispatcher,
    broker: &Broker,
    delivery: &Delivery,
    incoming: &Incoming,
    decision: Decision,
) -> Result<(), BrokerError> {
    let topology = &dispatcher.config.topology;
    match decision {
        Decision::Duplicate => Ok(()),
        Decision::Delay {
            wait,
            attempts,
            reason,
            history,
        } => {
            let tier = topology.tier_for(wait);
            let not_before = Utc::now() + chrono::Duration::from_std(wait).unwrap_or_default();
            let properties = copy_properties(&delivery.properties).with_headers(with_headers(
                carried_headers(&delivery.properties),
                &[
                    (headers::ATTEMPTS, attempts.to_string()),
                    (
                        headers::FIRST_SEEN,
                        incoming.first_seen.timestamp_millis().to_string(),
                    ),
                    (
                        headers::NOT_BEFORE,
                        not_before.timestamp_millis().to_string(),
                    ),
                    (headers::HISTORY, history),
                ],
            ));
            broker
                .publish(Outgoing {
                    exchange: "",
                    routing_key: &topology.delay_queue(tier),
                    body: &delivery.data,
                    properties,
                    mandatory: true,
                })
                .await?;
            crate::metrics::retry_scheduled(reason);
            Ok(())
        }
        Decision::Finish(finish) => {
            publish_finish(dispatcher, broker, delivery, incoming, *finish).await
        }
    }
}

async fn publish_finish(
    dispatcher: &Dispatcher,
    broker: &Broker,
    delivery: &Delivery,
    incoming: &Incoming,
    finish: Finish,
) -> Result<(), BrokerError> {
    let topology = &dispatcher.config.topology;
    for event in &finish.events {
        let body = serde_json::to_vec(event).expect("events serialize");
        broker
            .publish(Outgoing {
                exchange: &topology.results_exchange,
                routing_key: mail_dispatch_domain::NeedsReauthEvent::ROUTING_KEY,
                body: &body,
                properties: json_properties(),
                mandatory: false,
            })
            .await?;
    }
    if let Some(dead) = &finish.dead_letter {
        let properties = copy_properties(&delivery.properties).with_headers(with_headers(
            carried_headers(&delivery.properties),
            &[
                (headers::REASON, dead.reason.as_str().to_owned()),
                (headers::DETAIL, dead.detail.clone()),
                (headers::ATTEMPTS, finish.result.attempts.to_string()),
                (
                    headers::FIRST_SEEN,
                    incoming.first_seen.timestamp_millis().to_string(),
                ),
                (
                    headers::JOB_ID,
                    finish.result.job_id.clone().unwrap_or_default(),
                ),
                (headers::DEAD_AT, Utc::now().to_rfc3339()),
            ],
        ));
        broker
            .publish(Outgoing {
                exchange: &topology.dead_exchange,
                routing_key: "",
                body: &delivery.data,
                properties,
                mandatory: true,
            })
            .await?;
        crate::metrics::dead_letter(dead.reason);
    }
    let body = serde_json::to_vec(&finish.result).expect("results serialize");
    let mut properties = json_properties().with_timestamp(Utc::now().timestamp() as u64);
    if let Some(id) = &finish.result.job_id {
        properties = properties.with_message_id(ShortString::from(id.as_str()));
    }
    broker
        .publish(Outgoing {
            exchange: &topology.results_exchange,
            routing_key: finish.result.routing_key(),
            body: &body,
            properties,
            mandatory: false,
        })
        .await?;
    if let Some(key) = finish.ledger_key {
        dispatcher.published.push(key);
    }
    let latency = (Utc::now() - incoming.first_seen)
        .to_std()
        .unwrap_or_default();
    crate::metrics::completed(&finish.result, latency);
    Ok(())
}

/// The job's own properties, kept on delayed and dead-lettered copies.
fn copy_properties(p: &BasicProperties) -> BasicProperties {
    let mut out = BasicProperties::default().with_delivery_mode(2);
    if let Some(ct) = p.content_type() {
        out = out.with_content_type(ct.clone());
    }
    if let Some(id) = p.message_id() {
        out = out.with_message_id(id.clone());
    }
    if let Some(ts) = p.timestamp() {
        out = out.with_timestamp(*ts);
    }
    out
}

/// The job's headers minus ours and the broker's `x-death` (rewritten each copy).
fn carried_headers(p: &BasicProperties) -> FieldTable {
    let mut table = FieldTable::default();
    if let Some(h) = p.headers() {
        for (k, v) in h.inner() {
            let key = k.as_str();
            if key.starts_with("x-mail-dispatch-")
                || key == "x-death"
                || key.starts_with("x-first-death")
                || key.starts_with("x-last-death")
            {
                continue;
            }
            table.insert(k.clone(), v.clone());
        }
    }
    table
}
