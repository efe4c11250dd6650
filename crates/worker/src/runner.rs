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
use lapin::types::AMQPValue;
use lapin::types::{FieldTable, ShortString};
use mail_dispatch_broker::{
    BodyCharge, BoundedConsumer, Broker, BrokerError, MemoryBudget, Outgoing, Topology, header_i64,
    header_str, headers, json_properties, with_headers,
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
    let mut last: Option<(Broker, Arc<BoundedConsumer>)> = None;
    // One set of slots for the life of the worker, not one per connection: tasks
    // of a dropped connection still run, and must still count. The same holds for
    // the memory budget.
    let slots = Arc::new(Semaphore::new(config.concurrency.max(1)));
    let budget = MemoryBudget::new(config.memory_budget_bytes);
    metrics::gauge!(crate::metrics::MEMORY_BUDGET_BYTES).set(budget.capacity() as f64);

    'connection: while !shutdown.is_cancelled() {
        let connected = tokio::select! {
            r = connect(config, &budget) => r,
            () = shutdown.cancelled() => break,
        };
        let (broker, intake) = match connected {
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
        tracing::info!(queue = %config.topology.jobs_queue, concurrency = config.concurrency, memory_budget_bytes = budget.capacity(), "consuming");
        let mut consumer = intake.consumer.clone();
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => {
                    // Bounded: the cancel-ok may queue behind a delivery the relay
                    // holds back until running jobs free memory.
                    let _ = tokio::time::timeout(
                        Duration::from_secs(5),
                        intake.channel.basic_cancel(consumer.tag(), BasicCancelOptions::default()),
                    )
                    .await;
                    // The channel stays open: in-flight jobs still ack on it.
                    last = Some((broker.clone(), intake.clone()));
                    break 'connection;
                }
                next = consumer.next() => match next {
                    Some(Ok(delivery)) => {
                        let memory = intake.charge(&delivery);
                        metrics::gauge!(crate::metrics::MEMORY_HELD_BYTES).set(budget.held() as f64);
                        let permit = slots.clone().acquire_owned().await.expect("semaphore never closed");
                        tracker.spawn(process(dispatcher.clone(), broker.clone(), delivery, permit, (memory, budget.clone()), hard_stop.clone()));
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
        intake.close().await;
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
    if let Some((broker, intake)) = last {
        // Closing the consumer channel returns anything still prefetched; closed
        // explicitly (not on drop) so the connection's close does not race it.
        intake.close().await;
        broker.close().await;
    }
    health.set_amqp(false);
    dispatcher.published.flush(&*dispatcher.ledger).await;
    tracing::info!("worker stopped");
}

/// Two connections: the publisher's, direct, and the consumer's, through the
/// memory-budgeted relay (see `mail_dispatch_broker::BoundedConsumer`), so that a
/// delivery held back for memory never holds back a publisher confirm.
async fn connect(
    config: &crate::WorkerConfig,
    budget: &MemoryBudget,
) -> Result<(Broker, Arc<BoundedConsumer>), BrokerError> {
    let broker = Broker::connect(&config.amqp_url, &format!("{}-publish", config.instance)).await?;
    broker.declare(&config.topology).await?;
    let prefetch = u16::try_from(config.concurrency).unwrap_or(u16::MAX).max(1);
    let consumer = BoundedConsumer::open(
        &config.amqp_url,
        &config.instance,
        &config.topology.jobs_queue,
        prefetch,
        budget.clone(),
    )
    .await;
    match consumer {
        Ok(consumer) => Ok((broker, Arc::new(consumer))),
        Err(e) => {
            broker.close().await;
            Err(e)
        }
    }
}

fn millis_to_time(ms: i64) -> Option<DateTime<Utc>> {
    Utc.timestamp_millis_opt(ms).single()
}

/// Far above any job's real attempt count; keeps sums with it far from overflowing.
const MAX_CARRIED_ATTEMPTS: i64 = 1_000_000;
/// The quorum queue's count of earlier deliveries of a message.
const DELIVERY_COUNT: &str = "x-delivery-count";

/// Reads what the dispatcher needs from a delivery. The body moves out of the
/// delivery (a job may be tens of MB: it is held once).
pub fn incoming_from(delivery: &mut Delivery, topology: &Topology) -> Incoming {
    read_incoming(
        &delivery.properties,
        delivery.redelivered,
        std::mem::take(&mut delivery.data),
        topology,
        Utc::now(),
    )
}

/// [`incoming_from`] on the parts of a delivery. Everything here is producer
/// input, so it is bounded: instants are never later than `now`, counts are
/// clamped, the history is capped.
fn read_incoming(
    p: &BasicProperties,
    redelivered: bool,
    body: Vec<u8>,
    topology: &Topology,
    now: DateTime<Utc>,
) -> Incoming {
    let published = p
        .timestamp()
        .and_then(|secs| i64::try_from(secs).ok())
        .and_then(|secs| Utc.timestamp_opt(secs, 0).single());
    // Our headers count only on a copy one of our delay queues handed back: on
    // anything else they are a producer's, who could zero or stretch a job's
    // budget with them, or have it wait forever.
    let ours = from_our_delay_queue(p, topology);
    let carried = |name: &str| if ours { header_i64(p, name) } else { None };
    Incoming {
        body,
        message_id: p.message_id().as_ref().map(|m| m.as_str().to_owned()),
        attempts: carried(headers::ATTEMPTS).map_or(0, |n| n.clamp(0, MAX_CARRIED_ATTEMPTS) as u32),
        first_seen: carried(headers::FIRST_SEEN)
            .and_then(millis_to_time)
            .or(published)
            .map_or(now, |t| t.min(now)),
        not_before: carried(headers::NOT_BEFORE).and_then(millis_to_time),
        history: if ours {
            header_str(p, headers::HISTORY)
                .map(crate::dispatch::cap_history)
                .unwrap_or_default()
        } else {
            String::new()
        },
        // A first delivery's count is not the broker's: a copy we re-published
        // does not carry it (see `carried_headers`), a producer might.
        delivery_count: if redelivered {
            header_i64(p, DELIVERY_COUNT).map_or(0, |n| n.clamp(0, u32::MAX.into()) as u32)
        } else {
            0
        },
        in_flight: Default::default(),
    }
}

/// Whether the last time this message was dead-lettered, it was by one of our
/// delay queues at the end of its TTL (the broker's `x-death`, newest first).
fn from_our_delay_queue(p: &BasicProperties, topology: &Topology) -> bool {
    let Some(AMQPValue::FieldArray(deaths)) =
        p.headers().as_ref().and_then(|h| h.inner().get("x-death"))
    else {
        return false;
    };
    let Some(AMQPValue::FieldTable(last)) = deaths.as_slice().first() else {
        return false;
    };
    let text = |name: &str| match last.inner().get(name) {
        Some(AMQPValue::LongString(s)) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        Some(AMQPValue::ShortString(s)) => Some(s.as_str().to_owned()),
        _ => None,
    };
    text("reason").as_deref() == Some("expired")
        && text("queue").is_some_and(|queue| {
            topology
                .delay_tiers
                .iter()
                .any(|tier| topology.delay_queue(*tier) == queue)
        })
}

async fn process(
    dispatcher: Arc<Dispatcher>,
    broker: Broker,
    mut delivery: Delivery,
    _slot: OwnedSemaphorePermit,
    (memory, budget): (BodyCharge, MemoryBudget),
    hard_stop: CancellationToken,
) {
    metrics::gauge!(crate::metrics::JOBS_IN_FLIGHT).increment(1.0);
    metrics::counter!(crate::metrics::JOBS_RECEIVED).increment(1);
    let incoming = incoming_from(&mut delivery, &dispatcher.config.topology);
    // One span for the whole delivery, from receipt to ack: the dispatcher fills in
    // the job's fields once it has decoded it, so publish and ack failures carry them.
    let span = tracing::info_span!(
        "job",
        job.id = tracing::field::Empty,
        org.id = tracing::field::Empty,
        category = tracing::field::Empty,
        provider = tracing::field::Empty,
        attempt = incoming.attempts.saturating_add(1),
        delivery_tag = delivery.delivery_tag,
    );
    settle(dispatcher, broker, delivery, incoming, hard_stop)
        .instrument(span)
        .await;
    drop(memory);
    metrics::gauge!(crate::metrics::MEMORY_HELD_BYTES).set(budget.held() as f64);
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
            let _ = dispatcher.ledger.release_publish(&key).await;
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
            settle_dropped(&dispatcher, &incoming).await;
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

/// The shutdown grace ran out and this delivery's work was dropped where it
/// stood. A send that was at the provider may have been accepted: its claim is
/// marked ambiguous, so that no later delivery sends it again without saying so
/// (it fails with a result that says the message may have gone). A claim with
/// nothing at the provider is released, so the job's next delivery need not
/// wait for the lease. (Both only while the claim is this delivery's and still
/// `claimed`: an outcome already recorded stays.) If PostgreSQL cannot be
/// reached now, the claim keeps its lease, and a later delivery sends again once
/// it expires: one of the paths in the README that can send twice.
async fn settle_dropped(dispatcher: &Dispatcher, incoming: &Incoming) {
    use crate::in_flight::Dropped;
    let ledger = &dispatcher.ledger;
    match incoming.in_flight.take() {
        Dropped::Nothing => {}
        Dropped::Claimed(key, owner) => {
            if let Err(e) = ledger.release_job(&key, owner).await {
                tracing::warn!(error = %e, "could not release the claim of a job dropped at shutdown; it waits for its lease");
            }
        }
        Dropped::AtProvider(key, owner, provider) => {
            crate::metrics::ambiguous_send(provider, "shutdown");
            match ledger.mark_ambiguous(&key, owner).await {
                Ok(_) => tracing::warn!(
                    %provider,
                    "shutdown grace over while a send was at the provider; recorded as ambiguous, not to be sent again"
                ),
                Err(e) => tracing::error!(
                    error = %e,
                    %provider,
                    "shutdown grace over while a send was at the provider, and it could not be recorded as ambiguous: the job may be sent again after its claim's lease"
                ),
            }
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
        Decision::Duplicate | Decision::ClaimLost => Ok(()),
        Decision::Delay {
            wait,
            attempts,
            reason,
            history,
        } => {
            let tier = topology.tier_for(wait);
            let not_before = chrono::Duration::from_std(wait)
                .ok()
                .and_then(|wait| Utc::now().checked_add_signed(wait))
                .unwrap_or(DateTime::<Utc>::MAX_UTC);
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
                    body: &incoming.body,
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
                routing_key: event.routing_key(),
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
                body: &incoming.body,
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
    let published = broker
        .publish(Outgoing {
            exchange: &topology.results_exchange,
            routing_key: finish.result.routing_key(),
            body: &body,
            properties,
            mandatory: false,
        })
        .await;
    if let Err(e) = &published
        && e.maybe_delivered()
    {
        // At least once: the next delivery publishes the recorded result again
        // rather than risk none (its message_id, the job id, tells the two apart).
        tracing::warn!(error = %e, "result publish unconfirmed; the job's next delivery publishes it again, so consumers may see it twice");
        metrics::counter!(crate::metrics::RESULTS_UNCONFIRMED).increment(1);
        dispatcher
            .results_unconfirmed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    published?;
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

/// The job's headers minus ours and the broker's `x-death` and
/// `x-delivery-count` (rewritten each copy).
fn carried_headers(p: &BasicProperties) -> FieldTable {
    let mut table = FieldTable::default();
    if let Some(h) = p.headers() {
        for (k, v) in h.inner() {
            let key = k.as_str();
            if key.starts_with("x-mail-dispatch-")
                || key == "x-death"
                || key == DELIVERY_COUNT
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

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{FieldArray, LongString};

    fn text(s: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(s))
    }

    /// The `x-death` entry the broker writes when `queue` dead-letters a message.
    fn died_in(queue: &str, reason: &str) -> (&'static str, AMQPValue) {
        let mut death = FieldTable::default();
        death.insert("queue".into(), text(queue));
        death.insert("reason".into(), text(reason));
        death.insert("count".into(), AMQPValue::LongLongInt(1));
        (
            "x-death",
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
        )
    }

    fn ours(
        attempts: &str,
        first_seen: &str,
        not_before: &str,
        history: &str,
    ) -> Vec<(&'static str, AMQPValue)> {
        vec![
            (headers::ATTEMPTS, text(attempts)),
            (headers::FIRST_SEEN, text(first_seen)),
            (headers::NOT_BEFORE, text(not_before)),
            (headers::HISTORY, text(history)),
        ]
    }

    fn read(
        headers: Vec<(&'static str, AMQPValue)>,
        redelivered: bool,
    ) -> (Incoming, DateTime<Utc>) {
        let mut table = FieldTable::default();
        for (k, v) in headers {
            table.insert(k.into(), v);
        }
        let now = Utc::now();
        let p = json_properties().with_headers(table);
        (
            read_incoming(&p, redelivered, Vec::new(), &Topology::default(), now),
            now,
        )
    }

    #[test]
    fn our_headers_count_only_on_a_copy_from_our_delay_queue() {
        let now_ms = Utc::now().timestamp_millis();
        let earlier = (now_ms - 60_000).to_string();
        let later = (now_ms + 30_000).to_string();
        let mut from_delay = ours("3", &earlier, &later, "#1 x");
        from_delay.push(died_in("mail.jobs.delay.5000", "expired"));
        let (incoming, _) = read(from_delay, false);
        assert_eq!(incoming.attempts, 3);
        assert_eq!(incoming.first_seen.timestamp_millis(), now_ms - 60_000);
        assert_eq!(
            incoming.not_before.map(|t| t.timestamp_millis()),
            Some(now_ms + 30_000)
        );
        assert_eq!(incoming.history, "#1 x");

        // A producer's copy of them: no death at all, a death elsewhere, or not
        // by expiry.
        for death in [
            None,
            Some(died_in("someone.elses.queue", "expired")),
            Some(died_in("mail.jobs.send", "expired")),
            Some(died_in("mail.jobs.delay.5000", "rejected")),
        ] {
            let mut headers = ours("3", &earlier, &later, "#1 x");
            headers.extend(death.clone());
            let (incoming, now) = read(headers, false);
            assert_eq!(incoming.attempts, 0, "{death:?}");
            assert_eq!(incoming.first_seen, now, "{death:?}");
            assert_eq!(incoming.not_before, None, "{death:?}");
            assert_eq!(incoming.history, "", "{death:?}");
        }
    }

    /// Even with a death that names our queue (a producer can write `x-death`
    /// too), nothing read is out of bounds.
    #[test]
    fn what_is_read_is_bounded_whatever_the_headers_say() {
        let mut headers = ours(
            "4294967295",
            "8210266876799999",
            "8210266876799999",
            &"h".repeat(100_000),
        );
        headers.push(died_in("mail.jobs.delay.1000", "expired"));
        let (incoming, now) = read(headers, false);
        assert_eq!(incoming.attempts as i64, MAX_CARRIED_ATTEMPTS);
        assert_eq!(incoming.first_seen, now, "never later than now");
        assert_eq!(incoming.history.len(), crate::dispatch::HISTORY_MAX_CHARS);

        let (incoming, _) = read(
            vec![
                (headers::ATTEMPTS, text("-5")),
                died_in("mail.jobs.delay.1000", "expired"),
            ],
            false,
        );
        assert_eq!(incoming.attempts, 0);
    }

    #[test]
    fn the_delivery_count_is_the_brokers_only_on_a_redelivery() {
        let count = || vec![(DELIVERY_COUNT, AMQPValue::LongLongInt(7))];
        assert_eq!(read(count(), true).0.delivery_count, 7);
        assert_eq!(read(count(), false).0.delivery_count, 0);
        assert_eq!(read(vec![], true).0.delivery_count, 0);
    }
}
