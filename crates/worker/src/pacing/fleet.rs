//! Graph's concurrent requests per app and mailbox, shared by every replica.
//!
//! Outlook allows 4 concurrent requests per app and mailbox, whatever the number
//! of processes sending (https://learn.microsoft.com/graph/throttling-limits#outlook-service-limits).
//! The in-process semaphore of `limits` keeps one worker within that number;
//! this keeps all of them within it together: before a Graph send, the worker
//! takes one of the mailbox's slots in PostgreSQL (a lease), and gives it back
//! as soon as the provider answered. A worker that finds every slot held defers
//! the job (it goes to a delay queue, holding no consumer slot) instead of
//! polling.
//!
//! Cost: one statement before the send and one after it; a send that outlives
//! a third of the lease adds one extension per third. A crashed worker's slot is
//! free again when its lease expires.

use std::time::Duration;

use chrono::{DateTime, Utc};
use mail_dispatch_domain::ProviderKind;
use std::sync::Arc;

use mail_dispatch_store::{SlotLease, StoreError};
use tokio_util::task::AbortOnDropHandle;

use super::Pacer;
use super::limits::BUSY_RETRY;
use crate::ports::MailboxSlots;

/// How long a slot is held without an extension: what a crashed worker costs
/// its mailbox (one slot for this long).
pub const SLOT_LEASE: Duration = Duration::from_secs(30);

/// One of a mailbox's fleet-wide Graph slots, held for one send. Give it back
/// with [`FleetSlot::release`] once the provider answered; dropped without
/// that (an early return), it is released in the background.
pub struct FleetSlot {
    store: Arc<dyn MailboxSlots>,
    lease: Option<SlotLease>,
    /// Extends the lease every third of it while the send runs.
    _keeper: AbortOnDropHandle<()>,
}

impl FleetSlot {
    /// Takes one of `org`'s `slots` slots, or `None` when all are held.
    pub async fn acquire(
        store: &Arc<dyn MailboxSlots>,
        org: &str,
        slots: usize,
    ) -> Result<Option<FleetSlot>, StoreError> {
        let Some(lease) = store.acquire_mailbox_slot(org, slots, SLOT_LEASE).await? else {
            return Ok(None);
        };
        let keeper = {
            let (store, lease) = (Arc::clone(store), lease.clone());
            tokio::spawn(async move {
                let every = SLOT_LEASE / 3;
                loop {
                    tokio::time::sleep(every).await;
                    match store.extend_mailbox_slot(&lease, SLOT_LEASE).await {
                        Ok(true) => {}
                        Ok(false) => {
                            tracing::warn!(
                                "a mailbox slot's lease ran out while its send was running; the mailbox may see one request more than its limit"
                            );
                            return;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "could not extend a mailbox slot's lease");
                        }
                    }
                }
            })
        };
        Ok(Some(FleetSlot {
            store: Arc::clone(store),
            lease: Some(lease),
            _keeper: AbortOnDropHandle::new(keeper),
        }))
    }

    /// Gives the slot back now (one statement). If that fails, the lease
    /// expires on its own.
    pub async fn release(mut self) {
        if let Some(lease) = self.lease.take()
            && let Err(e) = self.store.release_mailbox_slot(&lease).await
        {
            tracing::warn!(error = %e, "could not release a mailbox slot; it is free when its lease expires");
        }
    }
}

impl std::fmt::Debug for FleetSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetSlot")
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

impl Drop for FleetSlot {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let store = Arc::clone(&self.store);
            runtime.spawn(async move {
                let _ = store.release_mailbox_slot(&lease).await;
            });
        }
    }
}

impl Pacer {
    /// Fleet-wide slots per mailbox (Graph's concurrent requests per app and mailbox).
    pub fn graph_mailbox_slots(&self) -> usize {
        self.config.graph_mailbox_concurrency.max(1)
    }

    /// Every fleet-wide slot of `org`'s mailbox is held by other sends: when to
    /// try again. Its deferred jobs come back one expected send time apart, as
    /// those the local limits defer do.
    pub fn fleet_busy(
        &self,
        org: &str,
        provider: ProviderKind,
        now: DateTime<Utc>,
    ) -> DateTime<Utc> {
        let until = now + chrono::Duration::from_std(BUSY_RETRY).expect("small");
        self.state()
            .flow_mut(org, provider, now)
            .wake_slot(&self.config, provider, until)
    }
}
