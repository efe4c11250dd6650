//! A name prefix per test, a tap on the results exchange, and cleanup.

use std::time::Duration;

use futures_util::StreamExt as _;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use mail_dispatch_broker::{Broker, Outgoing, Topology, json_properties};
use serde_json::Value;
use tokio::sync::mpsc;

/// The AMQP side of a test: its own names, its own results tap.
pub struct TestAmqp {
    pub topology: Topology,
    broker: tokio::sync::Mutex<Broker>,
    /// The results tap's queue (named, so it survives a connection loss).
    tap_queue: String,
}

/// A message seen on the results exchange.
#[derive(Debug, Clone)]
pub struct Seen {
    pub routing_key: String,
    pub body: Value,
    pub properties: BasicProperties,
}

/// Everything published to the results exchange, in order.
pub struct ResultsTap {
    rx: mpsc::UnboundedReceiver<Seen>,
    seen: Vec<Seen>,
}

impl TestAmqp {
    /// Declares a topology with a unique name prefix (the default names and tiers otherwise).
    pub async fn new() -> TestAmqp {
        let prefix = format!("{}.", crate::unique("t"));
        let topology = Topology::with_prefix(&prefix);
        let broker = Broker::connect(&crate::amqp_url(), "mail-dispatch-test")
            .await
            .expect("RabbitMQ must run on 127.0.0.1:5672 (see README)");
        broker.declare(&topology).await.expect("topology declares");
        TestAmqp {
            topology,
            broker: tokio::sync::Mutex::new(broker),
            tap_queue: format!("{prefix}results.tap"),
        }
    }

    /// The prefix of every name (as `MAIL_DISPATCH_QUEUE_PREFIX`).
    pub fn prefix(&self) -> String {
        self.topology
            .jobs_exchange
            .trim_end_matches("mail.jobs")
            .to_owned()
    }

    /// A connected broker, reconnecting if the last one was closed under us.
    pub async fn broker(&self) -> Broker {
        let mut b = self.broker.lock().await;
        if !b.is_connected() {
            for _ in 0..50 {
                if let Ok(fresh) = Broker::connect(&crate::amqp_url(), "mail-dispatch-test").await {
                    *b = fresh;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        b.clone()
    }

    /// Starts recording the results exchange (call before publishing jobs). The
    /// tap's queue is named and durable, and its consumer reconnects, so results
    /// published while connections are being closed are not missed.
    pub async fn tap_results(&self) -> ResultsTap {
        let (tx, rx) = mpsc::unbounded_channel();
        let queue = self.tap_queue.clone();
        let exchange = self.topology.results_exchange.clone();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            loop {
                let Ok(conn) =
                    Connection::connect(&crate::amqp_url(), ConnectionProperties::default()).await
                else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let Ok(channel) = conn.create_channel().await else {
                    continue;
                };
                let declared = channel
                    .queue_declare(
                        queue.as_str().into(),
                        QueueDeclareOptions {
                            durable: true,
                            ..Default::default()
                        },
                        FieldTable::default(),
                    )
                    .await;
                if declared.is_err() {
                    continue;
                }
                let _ = channel
                    .queue_bind(
                        queue.as_str().into(),
                        exchange.as_str().into(),
                        "#".into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await;
                let Ok(mut consumer) = channel
                    .basic_consume(
                        queue.as_str().into(),
                        "tap".into(),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                else {
                    continue;
                };
                if let Some(r) = ready.take() {
                    let _ = r.send(());
                }
                while let Some(Ok(d)) = consumer.next().await {
                    let _ = d.ack(BasicAckOptions::default()).await;
                    let body = serde_json::from_slice(&d.data).unwrap_or(Value::Null);
                    let seen = Seen {
                        routing_key: d.routing_key.to_string(),
                        body,
                        properties: d.properties.clone(),
                    };
                    if tx.send(seen).is_err() {
                        let _ = conn.close(200, "bye".into()).await;
                        return;
                    }
                }
                if tx.is_closed() {
                    return;
                }
            }
        });
        let _ = tokio::time::timeout(Duration::from_secs(10), ready_rx).await;
        ResultsTap {
            rx,
            seen: Vec::new(),
        }
    }

    /// Publishes raw bytes as a job, the way producers do (persistent, JSON).
    pub async fn publish_raw(&self, body: &[u8], properties: BasicProperties) {
        for _ in 0..20 {
            let published = self
                .broker()
                .await
                .publish(Outgoing {
                    exchange: &self.topology.jobs_exchange,
                    routing_key: &self.topology.jobs_routing_key,
                    body,
                    properties: properties.clone(),
                    mandatory: true,
                })
                .await;
            if published.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("job could not be published");
    }

    /// Publishes a message straight to a queue (e.g. a delay queue), confirmed.
    pub async fn publish_to_queue(&self, queue: &str, body: &[u8], properties: BasicProperties) {
        self.broker()
            .await
            .publish(Outgoing {
                exchange: "",
                routing_key: queue,
                body,
                properties,
                mandatory: true,
            })
            .await
            .expect("message published");
    }

    pub async fn publish_job(&self, job: &Value) {
        let mut props = json_properties();
        if let Some(id) = job.get("id").and_then(Value::as_str) {
            props = props.with_message_id(id.into());
        }
        self.publish_raw(&serde_json::to_vec(job).unwrap(), props)
            .await;
    }

    /// Takes every message from a queue (acking them).
    pub async fn drain(&self, queue: &str) -> Vec<lapin::message::Delivery> {
        let channel = self.broker().await.channel().await.unwrap();
        let mut out = Vec::new();
        while let Some(m) = channel
            .basic_get(queue.into(), BasicGetOptions::default())
            .await
            .unwrap()
        {
            m.delivery.ack(BasicAckOptions::default()).await.unwrap();
            out.push(m.delivery);
        }
        out
    }

    /// Messages in a queue now.
    pub async fn queue_len(&self, queue: &str) -> u32 {
        let channel = self.broker().await.channel().await.unwrap();
        let q = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        q.message_count()
    }
}

impl Drop for TestAmqp {
    fn drop(&mut self) {
        let topology = self.topology.clone();
        let tap = self.tap_queue.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let Ok(conn) =
                    Connection::connect(&crate::amqp_url(), ConnectionProperties::default()).await
                else {
                    return;
                };
                if let Ok(ch) = conn.create_channel().await {
                    let _ = ch
                        .queue_delete(tap.as_str().into(), QueueDeleteOptions::default())
                        .await;
                    for q in topology.queues() {
                        let _ = ch
                            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                            .await;
                    }
                    for e in topology.exchanges() {
                        let _ = ch
                            .exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default())
                            .await;
                    }
                }
                let _ = conn.close(200, "bye".into()).await;
            });
        })
        .join();
    }
}

impl ResultsTap {
    fn pull(&mut self) {
        while let Ok(s) = self.rx.try_recv() {
            self.seen.push(s);
        }
    }

    /// Waits until `pred` holds for some message seen, and returns the first such.
    pub async fn wait_for(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&Seen) -> bool,
    ) -> Option<Seen> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            self.pull();
            if let Some(s) = self.seen.iter().find(|s| pred(s)) {
                return Some(s.clone());
            }
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(s)) => self.seen.push(s),
                Ok(None) | Err(_) => return None,
            }
        }
    }

    /// The result of a job, waiting up to `timeout`; panics if none comes.
    pub async fn result(&mut self, job_id: &str, timeout: Duration) -> Value {
        self.wait_for(timeout, |s| {
            s.routing_key.starts_with("result.") && s.body["job_id"] == job_id
        })
        .await
        .unwrap_or_else(|| panic!("no result for job {job_id} within {timeout:?}"))
        .body
    }

    /// Waits for `n` results in total.
    pub async fn results(&mut self, n: usize, timeout: Duration) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            self.pull();
            let results: Vec<Value> = self
                .seen
                .iter()
                .filter(|s| s.routing_key.starts_with("result."))
                .map(|s| s.body.clone())
                .collect();
            if results.len() >= n {
                return results;
            }
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(s)) => self.seen.push(s),
                _ => panic!("only {} of {n} results within {timeout:?}", results.len()),
            }
        }
    }

    /// Everything seen so far (after a short grace for in-flight messages).
    pub async fn settle(&mut self, quiet: Duration) -> &[Seen] {
        while let Ok(Some(s)) = tokio::time::timeout(quiet, self.rx.recv()).await {
            self.seen.push(s);
        }
        self.pull();
        &self.seen
    }
}
