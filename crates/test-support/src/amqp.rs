//! A name prefix per test, a tap on the results exchange, and cleanup.

use std::time::Duration;

use futures_util::StreamExt as _;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use mail_dispatch_broker::{Broker, Outgoing, Topology, json_properties};
use serde_json::Value;
use tokio::sync::mpsc;

/// The AMQP side of a test: its own names, its own results tap.
pub struct TestAmqp {
    pub topology: Topology,
    pub broker: Broker,
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
    /// Declares a prefixed topology with short delay tiers (1 s, 2 s, 5 s).
    pub async fn new() -> TestAmqp {
        let mut topology = Topology::with_prefix(&format!("{}.", crate::unique("t")));
        topology.delay_tiers = [1, 2, 5].into_iter().map(Duration::from_secs).collect();
        let broker = Broker::connect(&crate::amqp_url(), "mail-dispatch-test")
            .await
            .expect("RabbitMQ must run on 127.0.0.1:5672 (see README)");
        broker.declare(&topology).await.expect("topology declares");
        TestAmqp { topology, broker }
    }

    /// Starts recording the results exchange (call before publishing jobs).
    pub async fn tap_results(&self) -> ResultsTap {
        let channel = self.broker.channel().await.unwrap();
        let queue = channel
            .queue_declare(
                ShortString::from(""),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        channel
            .queue_bind(
                queue.name().clone(),
                self.topology.results_exchange.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let mut consumer = channel
            .basic_consume(
                queue.name().clone(),
                "tap".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let _channel = channel;
            while let Some(Ok(d)) = consumer.next().await {
                let _ = d.ack(BasicAckOptions::default()).await;
                let body = serde_json::from_slice(&d.data).unwrap_or(Value::Null);
                let _ = tx.send(Seen {
                    routing_key: d.routing_key.to_string(),
                    body,
                    properties: d.properties.clone(),
                });
            }
        });
        ResultsTap {
            rx,
            seen: Vec::new(),
        }
    }

    /// Publishes raw bytes as a job, the way producers do (persistent, JSON).
    pub async fn publish_raw(&self, body: &[u8], properties: BasicProperties) {
        self.broker
            .publish(Outgoing {
                exchange: &self.topology.jobs_exchange,
                routing_key: &self.topology.jobs_routing_key,
                body,
                properties,
                mandatory: true,
            })
            .await
            .expect("job published");
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
        let channel = self.broker.channel().await.unwrap();
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
        let channel = self.broker.channel().await.unwrap();
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
