//! Graph's concurrent requests per app and mailbox, shared by every replica.
//!
//! Outlook allows 4 concurrent requests per app and mailbox, whatever the number
//! of processes sending (https://learn.microsoft.com/graph/throttling-limits#outlook-service-limits).
//! The mailbox's semaphore (created by `limits`) keeps one worker within that
//! number; this keeps all of them within it together: before a Graph send, the
//! worker takes one of the mailbox's slots in PostgreSQL (a lease), and gives it
//! back as soon as the provider answered.
//!
//! An admitted job that finds the mailbox full waits here, up to
//! [`FLEET_SLOT_WAIT`] in all, first for the semaphore, then for a fleet-wide
//! slot. A job done with its slot hands it to the next job of the same worker
//! waiting for one (in memory: the lease simply goes on); with none waiting
//! here it keeps the slot a moment (20 ms) for this worker's next send of the
//! mailbox, then releases it, which is announced by NOTIFY, so a waiting job of
//! another replica tries again at once. A slot freed by an expired lease is
//! found by a slow poll. Deferring it instead brought it back after a second
//! at the earliest, which kept a mailbox shared by three replicas at about half
//! its rate. Past the wait, the job is deferred (it goes to a delay queue,
//! holding no consumer slot). What waits is bounded: an admitted job counts in
//! its organization's in-flight cap (`org_max_in_flight` per worker), and only
//! `graph_mailbox_concurrency` of them per worker get as far as the database.
//!
//! Cost: one statement before the send and one after it, plus one more per
//! wake-up while waiting; none for a slot handed over in memory or kept idle. A send that
//! outlives a third of the lease adds one extension per third. A crashed
//! worker's slot is free again when its lease expires.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use chrono::{DateTime, Utc};
use mail_dispatch_domain::ProviderKind;
use mail_dispatch_store::{SlotLease, StoreError};
use rand::Rng as _;
use tokio::sync::{Notify, oneshot};
use tokio_util::task::AbortOnDropHandle;

use super::limits::BUSY_RETRY;
use super::{Pacer, Permit};
use crate::ports::MailboxSlots;

/// How long a slot is held without an extension: what a crashed worker costs
/// its mailbox (one slot for this long).
pub const SLOT_LEASE: Duration = Duration::from_secs(30);

/// How long a job that finds every slot of its mailbox held waits for one
/// before it is deferred: a few sends' time, so that a busy mailbox is kept
/// busy, and short beside the shutdown grace.
pub const FLEET_SLOT_WAIT: Duration = Duration::from_secs(2);

/// How long a slot nobody here waits for is kept before it goes back to the
/// fleet: the next send of the mailbox from this worker, if it comes by then,
/// takes it without a statement. Short beside a send, so that another
/// replica's waiting job loses little.
const IDLE_HOLD: Duration = Duration::from_millis(20);

/// How often a waiting job looks again without being told of a release (a
/// lease that expired, a notification missed while the listener reconnected):
/// this, plus up to as much again at random so that waiters do not all ask at once.
const FLEET_SLOT_POLL: Duration = Duration::from_millis(100);

/// The jobs of this worker waiting for one of a mailbox's slots.
#[derive(Default)]
struct MailboxWaiters {
    /// Woken when one of the mailbox's slots is freed, here or (through
    /// NOTIFY) elsewhere.
    freed: Notify,
    /// Where a slot this worker is done with goes next, oldest waiter first:
    /// handed over in memory, with no round trip to PostgreSQL. A waiter that
    /// gave up leaves a closed channel, skipped.
    handover: Mutex<VecDeque<oneshot::Sender<FleetSlot>>>,
    /// Slots a send was done with and nobody waited for, kept for
    /// [`IDLE_HOLD`] (tagged, so that their release finds them).
    idle: Mutex<Vec<(u64, FleetSlot)>>,
    next_tag: std::sync::atomic::AtomicU64,
}

impl MailboxWaiters {
    fn take_idle(&self) -> Option<FleetSlot> {
        self.idle
            .lock()
            .expect("poisoned")
            .pop()
            .map(|(_, slot)| slot)
    }
}

/// The jobs of this worker waiting for a mailbox's slot, per organization.
#[derive(Default)]
pub(super) struct SlotWaiters(Mutex<HashMap<String, Weak<MailboxWaiters>>>);

impl SlotWaiters {
    /// The waiters of `org`'s mailbox; kept alive by them.
    fn of(&self, org: &str) -> Arc<MailboxWaiters> {
        let mut waiters = self.0.lock().expect("poisoned");
        if let Some(w) = waiters.get(org).and_then(Weak::upgrade) {
            return w;
        }
        let w = Arc::new(MailboxWaiters::default());
        waiters.insert(org.to_owned(), Arc::downgrade(&w));
        w
    }

    fn get(&self, org: &str) -> Option<Arc<MailboxWaiters>> {
        self.0
            .lock()
            .expect("poisoned")
            .get(org)
            .and_then(Weak::upgrade)
    }

    /// One of `org`'s slots was freed: every job waiting for one tries again.
    fn wake(&self, org: &str) {
        if let Some(w) = self.get(org) {
            w.freed.notify_waiters();
        }
    }

    /// Gives `slot` to the longest-waiting job of this worker for `org`'s
    /// mailbox; back if none waits.
    fn hand_over(&self, org: &str, mut slot: FleetSlot) -> Option<FleetSlot> {
        let Some(w) = self.get(org) else {
            return Some(slot);
        };
        let mut queue = w.handover.lock().expect("poisoned");
        while let Some(waiter) = queue.pop_front() {
            match waiter.send(slot) {
                Ok(()) => return None,
                Err(back) => slot = back,
            }
        }
        Some(slot)
    }

    /// Forgets the organizations nobody waits for any more.
    pub(super) fn prune(&self) {
        self.0
            .lock()
            .expect("poisoned")
            .retain(|_, w| w.strong_count() > 0);
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.0.lock().expect("poisoned").len()
    }
}

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

    /// The slots an admitted Graph send needs before it goes: one of its
    /// mailbox's slots in this worker, then one of its fleet-wide slots, both
    /// held by `permit` until the send is over. Waits up to [`FLEET_SLOT_WAIT`]
    /// in all for them; `false` when the mailbox stayed full that long (the job
    /// is then deferred). A permit that needs no slot passes at once.
    pub async fn take_mailbox_slots(
        &self,
        permit: &mut Permit,
        store: &Arc<dyn MailboxSlots>,
    ) -> Result<bool, StoreError> {
        let Some(local) = permit.graph_mailbox.clone() else {
            return Ok(true);
        };
        let deadline = tokio::time::Instant::now() + FLEET_SLOT_WAIT;
        // Until the slots are taken, its time is a wait's, not a send's.
        permit.timed_a_send = false;
        if permit.mailbox_slot.is_none() {
            match tokio::time::timeout_at(deadline, local.acquire_owned()).await {
                Ok(Ok(slot)) => permit.mailbox_slot = Some(slot),
                // Closed never happens: the semaphore is never closed.
                Ok(Err(_)) | Err(_) => return Ok(false),
            }
        }
        let Some(slot) = self
            .fleet_slot_before(store, &permit.organization_id, deadline)
            .await?
        else {
            return Ok(false);
        };
        permit.fleet_slot = Some(Box::new(slot));
        // What the schedule learns is the send's time, not the wait's.
        permit.admitted_at = std::time::Instant::now();
        permit.timed_a_send = true;
        Ok(true)
    }

    /// One of `org`'s fleet-wide slots, waiting until `deadline` for one to be
    /// freed when all are held (or handed over by a job of this worker that
    /// is done with it); `None` if none was.
    async fn fleet_slot_before(
        &self,
        store: &Arc<dyn MailboxSlots>,
        org: &str,
        deadline: tokio::time::Instant,
    ) -> Result<Option<FleetSlot>, StoreError> {
        let waiters = self.slot_waiters.of(org);
        // In line for a handover from the first ask: a slot handed over while
        // this job asks PostgreSQL is not lost (it is released if unused).
        let (in_line, mut handed) = oneshot::channel();
        waiters
            .handover
            .lock()
            .expect("poisoned")
            .push_back(in_line);
        let mut in_line = true;
        loop {
            // Listening before asking: a slot freed between the answer and the
            // wait still wakes this job.
            let freed = waiters.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            match handed.try_recv() {
                Ok(slot) => return Ok(Some(slot)),
                Err(oneshot::error::TryRecvError::Closed) => in_line = false,
                Err(oneshot::error::TryRecvError::Empty) => {}
            }
            if let Some(slot) = waiters.take_idle() {
                return Ok(Some(slot));
            }
            if let Some(slot) = FleetSlot::acquire(store, org, self.graph_mailbox_slots()).await? {
                return Ok(Some(slot));
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let poll = FLEET_SLOT_POLL.mul_f64(1.0 + rand::rng().random::<f64>());
            tokio::select! {
                slot = &mut handed, if in_line => match slot {
                    Ok(slot) => return Ok(Some(slot)),
                    Err(_) => in_line = false,
                },
                () = freed => {}
                () = tokio::time::sleep_until((now + poll).min(deadline)) => {}
            }
        }
    }

    /// One of `org`'s fleet-wide slots was freed (by this worker or another):
    /// its waiting jobs try again.
    pub fn fleet_slot_freed(&self, org: &str) {
        self.slot_waiters.wake(org);
    }

    /// A send of `org` is over: its fleet-wide slot goes to the next job of
    /// this worker waiting for one (no PostgreSQL round trip, and the lease
    /// goes on); else it is kept for [`IDLE_HOLD`] for this worker's next send
    /// of the mailbox, and then goes back to the fleet, announced.
    pub(super) fn give_back_fleet_slot(&self, org: &str, slot: FleetSlot) {
        let Some(slot) = self.slot_waiters.hand_over(org, slot) else {
            return;
        };
        let waiters = self.slot_waiters.of(org);
        let tag = waiters
            .next_tag
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        waiters.idle.lock().expect("poisoned").push((tag, slot));
        tokio::spawn(async move {
            tokio::time::sleep(IDLE_HOLD).await;
            let unused = {
                let mut idle = waiters.idle.lock().expect("poisoned");
                idle.iter()
                    .position(|(t, _)| *t == tag)
                    .map(|i| idle.swap_remove(i).1)
            };
            if let Some(slot) = unused {
                slot.release().await;
                // This worker's waiters need not wait for the NOTIFY's round trip.
                waiters.freed.notify_waiters();
            }
        });
    }

    /// `org`'s mailbox stayed full through [`FLEET_SLOT_WAIT`]: when to try
    /// again. Its deferred jobs come back one expected send time apart, as
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
