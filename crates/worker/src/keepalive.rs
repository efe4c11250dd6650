//! Keeps idle grants alive, and finds dead ones before a notification does.
//!
//! Providers expire refresh tokens that go unused: Microsoft after 90 days
//! (AADSTS700082), Google after six months. An organization that sends only a
//! quarterly reminder would find its integration dead on the day it needs it.
//! Every `interval`, each worker refreshes the grants nobody refreshed for
//! `idle_after`. The refresh runs under the integration's refresh lease, taken by
//! a statement that re-reads when it was last refreshed, so across all replicas a
//! grant is refreshed once.
//! A grant the provider refuses turns `needs_reauth` now, and its
//! `integration.needs_reauth` event is published now, not when a job fails.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use mail_dispatch_broker::{Broker, Outgoing, json_properties};
use mail_dispatch_domain::NeedsReauthEvent;
use tokio_util::sync::CancellationToken;

use crate::tokens::KeepAlive;
use crate::{Services, WorkerConfig};

/// When and what the keep-alive refreshes.
#[derive(Clone, Copy, Debug)]
pub struct KeepAliveConfig {
    /// How often each worker looks for idle grants.
    pub interval: Duration,
    /// A grant not refreshed for this long is refreshed. Well below the
    /// providers' inactivity limits (90 days for Microsoft).
    pub idle_after: Duration,
    /// Grants refreshed per sweep at most (the rest wait for the next one).
    pub batch: i64,
}

impl Default for KeepAliveConfig {
    fn default() -> Self {
        KeepAliveConfig {
            interval: Duration::from_secs(3600),
            idle_after: Duration::from_secs(14 * 24 * 3600),
            batch: 200,
        }
    }
}

/// What one sweep did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    pub refreshed: usize,
    pub revoked: usize,
    pub failed: usize,
}

impl Services {
    /// Refreshes the grants idle for longer than `idle_after`. Returns what it did
    /// and the events of the grants found dead (to publish).
    pub async fn keep_alive_sweep(
        &self,
        config: &KeepAliveConfig,
    ) -> Result<(SweepReport, Vec<NeedsReauthEvent>), mail_dispatch_store::StoreError> {
        let idle = self
            .store
            .idle_grants(config.idle_after, config.batch)
            .await?;
        let mut report = SweepReport::default();
        let mut events = Vec::new();
        for (org, provider) in idle {
            match self
                .senders
                .tokens
                .keep_alive(&org, provider, config.idle_after)
                .await
            {
                Ok(KeepAlive::NotDue) => {}
                Ok(KeepAlive::Refreshed { .. }) => {
                    report.refreshed += 1;
                    crate::metrics::grant_keepalive(provider, "refreshed");
                }
                Ok(KeepAlive::Revoked { reason, .. }) => {
                    report.revoked += 1;
                    crate::metrics::grant_keepalive(provider, "revoked");
                    events.push(NeedsReauthEvent::new(&org, provider, &reason, Utc::now()));
                }
                Err(e) => {
                    report.failed += 1;
                    crate::metrics::grant_keepalive(provider, "error");
                    tracing::warn!(org.id = %org, %provider, error = %e, "keep-alive refresh failed; tried again next sweep");
                }
            }
        }
        Ok((report, events))
    }
}

/// Sweeps every `config.interval` until `shutdown`, publishing events where
/// `worker` does. Events that could not be published are kept and tried again at
/// the next sweep.
pub async fn run(
    services: Arc<Services>,
    worker: WorkerConfig,
    config: KeepAliveConfig,
    shutdown: CancellationToken,
) {
    let mut unpublished: Vec<NeedsReauthEvent> = Vec::new();
    let mut tick = tokio::time::interval(config.interval.max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match services.keep_alive_sweep(&config).await {
            Ok((report, events)) => {
                metrics::gauge!(crate::metrics::GRANT_KEEPALIVE_LAST_SWEEP)
                    .set(Utc::now().timestamp() as f64);
                if report != SweepReport::default() {
                    tracing::info!(
                        refreshed = report.refreshed,
                        revoked = report.revoked,
                        failed = report.failed,
                        "keep-alive sweep of idle grants"
                    );
                }
                unpublished.extend(events);
            }
            Err(e) => {
                tracing::warn!(error = %e, "keep-alive sweep could not read the integrations")
            }
        }
        if !unpublished.is_empty() {
            match publish_events(&worker, &unpublished).await {
                Ok(()) => unpublished.clear(),
                Err(e) => {
                    tracing::warn!(error = %e, pending = unpublished.len(), "could not publish needs_reauth events; tried again next sweep");
                    // Bounded: a broker down for long must not grow this forever.
                    let excess = unpublished.len().saturating_sub(10_000);
                    unpublished.drain(..excess);
                }
            }
        }
    }
}

async fn publish_events(
    config: &WorkerConfig,
    events: &[NeedsReauthEvent],
) -> Result<(), mail_dispatch_broker::BrokerError> {
    let broker =
        Broker::connect(&config.amqp_url, &format!("{}-keepalive", config.instance)).await?;
    let outcome = async {
        for event in events {
            let body = serde_json::to_vec(event).expect("events serialize");
            broker
                .publish(Outgoing {
                    exchange: &config.topology.results_exchange,
                    routing_key: NeedsReauthEvent::ROUTING_KEY,
                    body: &body,
                    properties: json_properties(),
                    mandatory: false,
                })
                .await?;
        }
        Ok(())
    }
    .await;
    broker.close().await;
    outcome
}
