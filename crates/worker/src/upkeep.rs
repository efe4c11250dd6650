//! The worker's own background work, in one place: only a process that
//! dispatches runs it (an admin-only process does not).
//!
//! - mailbox pauses of other replicas, loaded at start and then followed, and
//!   the Graph mailbox slots they free;
//! - the pacer's daily counts flushed to PostgreSQL every 2 s, and its state pruned;
//! - published marks written in batches (`published.rs`);
//! - finished ledger entries, and the Graph slots of mailboxes idle for a day,
//!   pruned every 10 minutes.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::task::AbortOnDropHandle;

use crate::Dispatcher;
use crate::services::{PacingEvent, Services};

/// Past this many mailboxes with a daily count, the pacer forgets those far below
/// their limit (the next flush brings a sending mailbox's total back).
const PACER_DAILY_ENTRIES: usize = 10_000;
const FLUSH_EVERY: Duration = Duration::from_secs(2);
const PRUNE_LEDGER_EVERY: Duration = Duration::from_secs(600);

impl Dispatcher {
    /// Starts the worker's background work, and the change listener of the
    /// shared `services` with pauses routed to this worker's pacer. Aborting the
    /// returned task stops all of it.
    pub fn run_upkeep(self: &Arc<Self>, services: &Arc<Services>) -> tokio::task::JoinHandle<()> {
        let (pacer, store) = (Arc::clone(&self.pacer), services.store.clone());
        let listener = services.follow_changes(Some(Arc::new(move |event| match event {
            PacingEvent::Paused {
                organization_id,
                until,
            } => pacer.apply_pause(organization_id, until),
            PacingEvent::Lifted { organization_id } => pacer.lift_pause(organization_id),
            PacingEvent::SlotFreed { organization_id } => pacer.fleet_slot_freed(organization_id),
            // Pauses announced while the listener was away: read them again.
            PacingEvent::Missed => {
                let (pacer, store) = (Arc::clone(&pacer), store.clone());
                tokio::spawn(async move { pacer.load_pauses(&store).await });
            }
        })));
        let (this, services) = (Arc::clone(self), Arc::clone(services));
        tokio::spawn(async move {
            let _listener = AbortOnDropHandle::new(listener);
            let store = &services.store;
            this.pacer.load_pauses(store).await;
            let marks = this.published.run(&*this.ledger);
            tokio::pin!(marks);
            let mut flush = tokio::time::interval(FLUSH_EVERY);
            let mut prune = tokio::time::interval(PRUNE_LEDGER_EVERY);
            loop {
                tokio::select! {
                    () = &mut marks => {}
                    _ = flush.tick() => {
                        this.pacer.flush_daily(store).await;
                        this.pacer.prune(chrono::Utc::now(), PACER_DAILY_ENTRIES);
                    }
                    _ = prune.tick() => {
                        match store.prune_ledger(this.config.ledger_retention, 1000).await {
                            Ok(0) => {}
                            Ok(n) => tracing::info!(deleted = n, "pruned finished ledger entries"),
                            Err(e) => tracing::warn!(error = %e, "ledger pruning failed"),
                        }
                        if let Err(e) = store.prune_mailbox_slots().await {
                            tracing::warn!(error = %e, "pruning idle mailbox slots failed");
                        }
                    }
                }
            }
        })
    }
}
