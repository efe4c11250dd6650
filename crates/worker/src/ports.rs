//! What the dispatcher needs of the world, as three narrow interfaces: the
//! idempotency ledger, the organizations' routes, and the senders.
//!
//! Production implements them over PostgreSQL and the providers' HTTP APIs
//! ([`Store`], [`Services`]); the worker's unit tests implement them in memory
//! (`fakes.rs`), so that every decision of `Dispatcher::handle` is tested without
//! a broker, a database or a provider. They mirror the calls the dispatcher makes
//! and nothing more: what the admin API or the background work needs stays on the
//! concrete services.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use mail_dispatch_domain::{OutgoingMessage, ProviderKind};
use mail_dispatch_providers::{Accepted, SendError};
use mail_dispatch_store::{Claim, ClaimOwner, JobKey, SlotLease, Store, StoreError};

use crate::in_flight::InFlight;
use crate::resolver::Route;
use crate::sender::{InProcessRetry, SendFailure};
use crate::services::Services;

/// The idempotency ledger: who holds a job id, and the outcome it recorded.
/// See [`Store`]'s methods of the same names for what each state means. A claim's
/// holder acts on it with its [`ClaimOwner`]; a call that returns `false` found
/// the claim no longer the owner's (taken over).
#[async_trait]
pub trait JobLedger: Send + Sync {
    /// Claims `key` for `lease`: this worker may send it, another holds it, or
    /// its outcome is already known (to publish again, or published).
    async fn claim_job(&self, key: &JobKey, lease: Duration) -> Result<Claim, StoreError>;
    /// Records the outcome of a claimed job; `lease` protects the publishing
    /// that follows from a concurrent redelivery.
    async fn complete_job(
        &self,
        key: &JobKey,
        owner: ClaimOwner,
        recorded: &serde_json::Value,
        lease: Duration,
    ) -> Result<bool, StoreError>;
    /// Records an outcome for a job id that was never claimed (an invalid job).
    async fn complete_unclaimed_job(
        &self,
        key: &JobKey,
        recorded: &serde_json::Value,
        lease: Duration,
    ) -> Result<Claim, StoreError>;
    /// Gives a claim up after an attempt whose outcome is known (to retry later).
    async fn release_job(&self, key: &JobKey, owner: ClaimOwner) -> Result<bool, StoreError>;
    /// Extends a live claim by `lease` from now.
    async fn extend_claim(
        &self,
        key: &JobKey,
        owner: ClaimOwner,
        lease: Duration,
    ) -> Result<bool, StoreError>;
    /// The claim's work was dropped while a send was at the provider: the job
    /// must not be sent again.
    async fn mark_ambiguous(&self, key: &JobKey, owner: ClaimOwner) -> Result<bool, StoreError>;
    /// Publishing a completed job's result failed: its next delivery may publish
    /// it at once.
    async fn release_publish(&self, key: &JobKey) -> Result<(), StoreError>;
    /// The broker confirmed these jobs' results.
    async fn mark_published(&self, keys: &[JobKey]) -> Result<(), StoreError>;
}

/// Which sender an organization uses, and what a send teaches about it: a grant
/// the provider refused, a mailbox the provider throttled.
#[async_trait]
pub trait Routes: Send + Sync {
    /// The organization's route right now.
    async fn resolve(&self, organization_id: &str) -> Result<Route, StoreError>;
    /// Marks the organization's integration `needs_reauth`; whether this call
    /// changed it (so that its event goes out once).
    async fn mark_needs_reauth(
        &self,
        organization_id: &str,
        reason: &str,
    ) -> Result<bool, StoreError>;
    /// Shares a provider's pause of the organization's mailbox with every replica.
    async fn pause_mailbox(
        &self,
        organization_id: &str,
        until: DateTime<Utc>,
        reason: &str,
    ) -> Result<(), StoreError>;
}

/// What a send through [`SendMail`] gives back: the outcome, the attempts it
/// made, and the failures of the attempts it retried in process.
pub type SendReport = (Result<Accepted, SendFailure>, u32, Vec<SendError>);

/// One send (with its short in-process retries) through the provider a route
/// names; `watch` learns when a request is at the provider.
#[async_trait]
pub trait SendMail: Send + Sync {
    async fn send(
        &self,
        provider: ProviderKind,
        organization_id: &str,
        message: &OutgoingMessage,
        retry: InProcessRetry,
        watch: &InFlight,
    ) -> SendReport;
}

/// A mailbox's fleet-wide Graph slots (leases shared by the replicas); see
/// [`Store`]'s methods of the same names.
#[async_trait]
pub trait MailboxSlots: Send + Sync {
    /// One of the mailbox's first `slots` slots for `lease`, or `None` when all are held.
    async fn acquire_mailbox_slot(
        &self,
        organization_id: &str,
        slots: usize,
        lease: Duration,
    ) -> Result<Option<SlotLease>, StoreError>;
    /// Extends a held lease; `false` when it is not held any more.
    async fn extend_mailbox_slot(
        &self,
        slot: &SlotLease,
        lease: Duration,
    ) -> Result<bool, StoreError>;
    /// Frees a held slot.
    async fn release_mailbox_slot(&self, slot: &SlotLease) -> Result<(), StoreError>;
}

/// The services a [`crate::Dispatcher`] is built on.
#[derive(Clone)]
pub struct Ports {
    pub ledger: Arc<dyn JobLedger>,
    pub routes: Arc<dyn Routes>,
    pub senders: Arc<dyn SendMail>,
    pub slots: Arc<dyn MailboxSlots>,
}

impl Ports {
    /// The production ones: the ledger in PostgreSQL, the cached resolver, the
    /// providers' senders.
    pub fn of(services: &Arc<Services>) -> Self {
        Ports {
            ledger: Arc::new(services.store.clone()),
            routes: services.clone(),
            senders: services.clone(),
            slots: Arc::new(services.store.clone()),
        }
    }
}

#[async_trait]
impl MailboxSlots for Store {
    async fn acquire_mailbox_slot(
        &self,
        organization_id: &str,
        slots: usize,
        lease: Duration,
    ) -> Result<Option<SlotLease>, StoreError> {
        Store::acquire_mailbox_slot(self, organization_id, slots, lease).await
    }
    async fn extend_mailbox_slot(
        &self,
        slot: &SlotLease,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        Store::extend_mailbox_slot(self, slot, lease).await
    }
    async fn release_mailbox_slot(&self, slot: &SlotLease) -> Result<(), StoreError> {
        Store::release_mailbox_slot(self, slot).await
    }
}

#[async_trait]
impl JobLedger for Store {
    async fn claim_job(&self, key: &JobKey, lease: Duration) -> Result<Claim, StoreError> {
        Store::claim_job(self, key, lease).await
    }
    async fn complete_job(
        &self,
        key: &JobKey,
        owner: ClaimOwner,
        recorded: &serde_json::Value,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        Store::complete_job(self, key, owner, recorded, lease).await
    }
    async fn complete_unclaimed_job(
        &self,
        key: &JobKey,
        recorded: &serde_json::Value,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        Store::complete_unclaimed_job(self, key, recorded, lease).await
    }
    async fn release_job(&self, key: &JobKey, owner: ClaimOwner) -> Result<bool, StoreError> {
        Store::release_job(self, key, owner).await
    }
    async fn extend_claim(
        &self,
        key: &JobKey,
        owner: ClaimOwner,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        Store::extend_claim(self, key, owner, lease).await
    }
    async fn mark_ambiguous(&self, key: &JobKey, owner: ClaimOwner) -> Result<bool, StoreError> {
        Store::mark_ambiguous(self, key, owner).await
    }
    async fn release_publish(&self, key: &JobKey) -> Result<(), StoreError> {
        Store::release_publish(self, key).await
    }
    async fn mark_published(&self, keys: &[JobKey]) -> Result<(), StoreError> {
        Store::mark_published(self, keys).await
    }
}

#[async_trait]
impl Routes for Services {
    async fn resolve(&self, organization_id: &str) -> Result<Route, StoreError> {
        self.resolver.resolve(organization_id).await
    }
    async fn mark_needs_reauth(
        &self,
        organization_id: &str,
        reason: &str,
    ) -> Result<bool, StoreError> {
        self.store.mark_needs_reauth(organization_id, reason).await
    }
    async fn pause_mailbox(
        &self,
        organization_id: &str,
        until: DateTime<Utc>,
        reason: &str,
    ) -> Result<(), StoreError> {
        self.store
            .pause_mailbox(organization_id, until, reason)
            .await
    }
}

#[async_trait]
impl SendMail for Services {
    async fn send(
        &self,
        provider: ProviderKind,
        organization_id: &str,
        message: &OutgoingMessage,
        retry: InProcessRetry,
        watch: &InFlight,
    ) -> SendReport {
        self.senders
            .send_watched(provider, organization_id, message, retry, watch)
            .await
    }
}
