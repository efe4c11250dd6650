//! The AMQP objects of contract §2, and the delay queues of the retry design.

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, ExchangeKind};

use crate::BrokerError;

/// Names and arguments of every exchange and queue. Defaults are the contract's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    pub jobs_exchange: String,
    pub jobs_queue: String,
    pub jobs_routing_key: String,
    pub results_exchange: String,
    pub dead_exchange: String,
    pub dead_queue: String,
    /// Delay queues are named `{delay_prefix}.{milliseconds}`.
    pub delay_prefix: String,
    /// One queue per tier, so a short delay never waits behind a long one
    /// (per-message TTLs only expire at the head of a queue).
    pub delay_tiers: Vec<Duration>,
    /// Quorum queue `x-delivery-limit`: a message redelivered this many times
    /// (e.g. because it crashes the worker) is dead-lettered.
    pub delivery_limit: u32,
}

impl Default for Topology {
    fn default() -> Self {
        Topology::with_prefix("")
    }
}

/// Delay tiers: 1 s up to 1 h.
pub const DEFAULT_DELAY_TIERS_SECS: &[u64] = &[1, 5, 15, 60, 300, 900, 3600];

impl Topology {
    /// The default names with `prefix` in front of each (tests isolate themselves this way).
    pub fn with_prefix(prefix: &str) -> Self {
        Topology {
            jobs_exchange: format!("{prefix}mail.jobs"),
            jobs_queue: format!("{prefix}mail.jobs.send"),
            jobs_routing_key: "send".into(),
            results_exchange: format!("{prefix}mail.results"),
            dead_exchange: format!("{prefix}mail.dead"),
            dead_queue: format!("{prefix}mail.dead"),
            delay_prefix: format!("{prefix}mail.jobs.delay"),
            delay_tiers: DEFAULT_DELAY_TIERS_SECS
                .iter()
                .map(|s| Duration::from_secs(*s))
                .collect(),
            delivery_limit: 20,
        }
    }

    pub fn delay_queue(&self, tier: Duration) -> String {
        format!("{}.{}", self.delay_prefix, tier.as_millis())
    }

    /// The tier for a wait: the longest tier not longer than `wait` (the job is
    /// re-delayed on arrival if time remains), or the shortest tier.
    pub fn tier_for(&self, wait: Duration) -> Duration {
        let mut tiers = self.delay_tiers.clone();
        tiers.sort();
        tiers
            .iter()
            .rev()
            .find(|t| **t <= wait)
            .or(tiers.first())
            .copied()
            .unwrap_or(Duration::from_secs(1))
    }

    /// Every queue name this topology declares.
    pub fn queues(&self) -> Vec<String> {
        let mut q = vec![self.jobs_queue.clone(), self.dead_queue.clone()];
        q.extend(self.delay_tiers.iter().map(|t| self.delay_queue(*t)));
        q
    }

    /// Every exchange name this topology declares.
    pub fn exchanges(&self) -> Vec<String> {
        vec![
            self.jobs_exchange.clone(),
            self.results_exchange.clone(),
            self.dead_exchange.clone(),
        ]
    }

    pub(crate) async fn declare(
        &self,
        channel: &Channel,
        dead_queue_exists: bool,
    ) -> Result<(), BrokerError> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        channel
            .exchange_declare(
                self.jobs_exchange.as_str().into(),
                ExchangeKind::Direct,
                durable,
                FieldTable::default(),
            )
            .await?;
        channel
            .exchange_declare(
                self.results_exchange.as_str().into(),
                ExchangeKind::Topic,
                durable,
                FieldTable::default(),
            )
            .await?;
        channel
            .exchange_declare(
                self.dead_exchange.as_str().into(),
                ExchangeKind::Fanout,
                durable,
                FieldTable::default(),
            )
            .await?;

        let queue = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        let mut jobs = quorum_args();
        jobs.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(self.delivery_limit.into()),
        );
        jobs.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(self.dead_exchange.as_str().into()),
        );
        jobs.insert(
            "x-dead-letter-strategy".into(),
            AMQPValue::LongString("at-least-once".into()),
        );
        jobs.insert(
            "x-overflow".into(),
            AMQPValue::LongString("reject-publish".into()),
        );
        channel
            .queue_declare(self.jobs_queue.as_str().into(), queue, jobs)
            .await?;
        channel
            .queue_bind(
                self.jobs_queue.as_str().into(),
                self.jobs_exchange.as_str().into(),
                self.jobs_routing_key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;

        // A classic queue: people read it with basic.get and hand messages back, which
        // a quorum queue would count towards its delivery limit (20 by default from
        // RabbitMQ 4.0) and eventually drop.
        if !dead_queue_exists {
            channel
                .queue_declare(
                    self.dead_queue.as_str().into(),
                    queue,
                    FieldTable::default(),
                )
                .await?;
        }
        channel
            .queue_bind(
                self.dead_queue.as_str().into(),
                self.dead_exchange.as_str().into(),
                ShortString::from(""),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;

        for tier in &self.delay_tiers {
            let mut args = quorum_args();
            args.insert(
                "x-message-ttl".into(),
                AMQPValue::LongLongInt(tier.as_millis() as i64),
            );
            args.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString(self.jobs_exchange.as_str().into()),
            );
            args.insert(
                "x-dead-letter-routing-key".into(),
                AMQPValue::LongString(self.jobs_routing_key.as_str().into()),
            );
            args.insert(
                "x-dead-letter-strategy".into(),
                AMQPValue::LongString("at-least-once".into()),
            );
            args.insert(
                "x-overflow".into(),
                AMQPValue::LongString("reject-publish".into()),
            );
            channel
                .queue_declare(self.delay_queue(*tier).into(), queue, args)
                .await?;
        }
        Ok(())
    }
}

fn quorum_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_goes_to_the_longest_tier_not_longer_than_it() {
        let t = Topology::default();
        let s = Duration::from_secs;
        assert_eq!(t.tier_for(Duration::from_millis(200)), s(1));
        assert_eq!(t.tier_for(s(4)), s(1));
        assert_eq!(t.tier_for(s(5)), s(5));
        assert_eq!(t.tier_for(s(59)), s(15));
        assert_eq!(t.tier_for(s(86400)), s(3600));
        assert_eq!(t.delay_queue(s(5)), "mail.jobs.delay.5000");
    }

    #[test]
    fn defaults_are_the_contract_names() {
        let t = Topology::default();
        assert_eq!(t.jobs_exchange, "mail.jobs");
        assert_eq!(t.jobs_queue, "mail.jobs.send");
        assert_eq!(t.results_exchange, "mail.results");
        assert_eq!(t.dead_exchange, "mail.dead");
        assert_eq!(t.dead_queue, "mail.dead");
    }
}
