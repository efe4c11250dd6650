//! In-memory fakes of the dispatcher's [ports](crate::ports), for unit tests of
//! `Dispatcher::handle`: no broker, no database, no provider, no sleeping.
//!
//! Each fake keeps the state a test sets up or asserts on. The ledger follows the
//! same state machine as `job_ledger` in PostgreSQL (see `Claim` and
//! `Store::claim_job`), with a lease that either is live or has run out, so that a
//! test says which instead of waiting for it.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use mail_dispatch_domain::{OutgoingMessage, ProviderKind};
use mail_dispatch_providers::Accepted;
use mail_dispatch_store::{Claim, ClaimOwner, JobKey, SlotLease, StoreError};

use crate::in_flight::InFlight;
use crate::ports::{JobLedger, MailboxSlots, Routes, SendMail, SendReport};
use crate::resolver::Route;
use crate::sender::{InProcessRetry, SendFailure};

fn unavailable() -> StoreError {
    StoreError::Unavailable("the fake database is down".into())
}

/// A job id's row in the fake ledger.
#[derive(Clone, Debug, PartialEq)]
pub enum Entry {
    /// Claimed by `owner`, `claims` times in a row without an outcome. `live`:
    /// the holder's lease still runs (a claim of another worker, or this
    /// dispatcher's own while it sends); otherwise it ran out and the next claim
    /// takes it over.
    Claimed {
        claims: i32,
        live: bool,
        owner: ClaimOwner,
    },
    /// Given up after an attempt whose outcome is known: the next claim starts
    /// the count again.
    Released,
    /// A send was at the provider when its worker dropped it; `owner` is the
    /// delivery that claimed it since, to record its outcome without sending.
    Ambiguous { owner: Option<ClaimOwner> },
    /// The outcome is recorded. `lease_over`: its publisher's lease ran out (or it
    /// was released), so a redelivery publishes the recorded result again.
    Completed {
        recorded: serde_json::Value,
        lease_over: bool,
    },
    /// The result was confirmed published.
    Published,
}

#[derive(Default)]
pub struct FakeLedger {
    pub entries: Mutex<HashMap<JobKey, Entry>>,
    /// Every call fails as if PostgreSQL were unreachable.
    pub down: AtomicBool,
    /// Claims extended while a send ran.
    pub extensions: AtomicU32,
    /// The last owner drawn (each claim draws a new one, as the store's sequence).
    owners: AtomicI64,
}

impl FakeLedger {
    pub fn set(&self, key: JobKey, entry: Entry) {
        self.entries.lock().unwrap().insert(key, entry);
    }

    pub fn get(&self, key: &JobKey) -> Option<Entry> {
        self.entries.lock().unwrap().get(key).cloned()
    }

    fn check(&self) -> Result<(), StoreError> {
        if self.down.load(Ordering::SeqCst) {
            Err(unavailable())
        } else {
            Ok(())
        }
    }

    fn claim(&self, entries: &mut HashMap<JobKey, Entry>, key: &JobKey) -> Claim {
        let owner = ClaimOwner(self.owners.fetch_add(1, Ordering::SeqCst) + 1);
        let (next, claim) = match entries.get(key) {
            None | Some(Entry::Released) => (
                Entry::Claimed {
                    claims: 1,
                    live: true,
                    owner,
                },
                Claim::Acquired { claims: 1, owner },
            ),
            Some(Entry::Claimed { live: true, .. })
            | Some(Entry::Completed {
                lease_over: false, ..
            }) => return Claim::Busy,
            Some(Entry::Claimed {
                claims,
                live: false,
                ..
            }) => (
                Entry::Claimed {
                    claims: claims + 1,
                    live: true,
                    owner,
                },
                Claim::Acquired {
                    claims: claims + 1,
                    owner,
                },
            ),
            Some(Entry::Ambiguous { .. }) => (
                Entry::Ambiguous { owner: Some(owner) },
                Claim::Ambiguous { owner },
            ),
            Some(Entry::Completed { recorded, .. }) => {
                return Claim::Completed(Some(recorded.clone()));
            }
            Some(Entry::Published) => return Claim::Published,
        };
        entries.insert(key.clone(), next);
        claim
    }

    /// Whether `owner` holds the job's claim (the fencing every holder's write checks).
    fn held_by(entries: &HashMap<JobKey, Entry>, key: &JobKey, owner: ClaimOwner) -> bool {
        match entries.get(key) {
            Some(Entry::Claimed { owner: o, .. }) => *o == owner,
            Some(Entry::Ambiguous { owner: o }) => *o == Some(owner),
            _ => false,
        }
    }
}

#[async_trait]
impl JobLedger for FakeLedger {
    async fn claim_job(&self, key: &JobKey, _lease: Duration) -> Result<Claim, StoreError> {
        self.check()?;
        Ok(self.claim(&mut self.entries.lock().unwrap(), key))
    }

    async fn complete_job(
        &self,
        key: &JobKey,
        owner: ClaimOwner,
        recorded: &serde_json::Value,
        _lease: Duration,
    ) -> Result<bool, StoreError> {
        self.check()?;
        let mut entries = self.entries.lock().unwrap();
        if !Self::held_by(&entries, key, owner) {
            return Ok(false);
        }
        entries.insert(
            key.clone(),
            Entry::Completed {
                recorded: recorded.clone(),
                lease_over: false,
            },
        );
        Ok(true)
    }

    async fn complete_unclaimed_job(
        &self,
        key: &JobKey,
        recorded: &serde_json::Value,
        _lease: Duration,
    ) -> Result<Claim, StoreError> {
        self.check()?;
        let mut entries = self.entries.lock().unwrap();
        if entries.contains_key(key) {
            return Ok(self.claim(&mut entries, key));
        }
        entries.insert(
            key.clone(),
            Entry::Completed {
                recorded: recorded.clone(),
                lease_over: false,
            },
        );
        let owner = ClaimOwner(self.owners.fetch_add(1, Ordering::SeqCst) + 1);
        Ok(Claim::Acquired { claims: 1, owner })
    }

    async fn release_job(&self, key: &JobKey, owner: ClaimOwner) -> Result<bool, StoreError> {
        self.check()?;
        let mut entries = self.entries.lock().unwrap();
        if !matches!(entries.get(key), Some(Entry::Claimed { owner: o, .. }) if *o == owner) {
            return Ok(false);
        }
        entries.insert(key.clone(), Entry::Released);
        Ok(true)
    }

    async fn extend_claim(
        &self,
        key: &JobKey,
        owner: ClaimOwner,
        _lease: Duration,
    ) -> Result<bool, StoreError> {
        self.check()?;
        self.extensions.fetch_add(1, Ordering::SeqCst);
        Ok(Self::held_by(&self.entries.lock().unwrap(), key, owner))
    }

    async fn mark_ambiguous(&self, key: &JobKey, owner: ClaimOwner) -> Result<bool, StoreError> {
        self.check()?;
        let mut entries = self.entries.lock().unwrap();
        if !matches!(entries.get(key), Some(Entry::Claimed { owner: o, .. }) if *o == owner) {
            return Ok(false);
        }
        entries.insert(key.clone(), Entry::Ambiguous { owner: None });
        Ok(true)
    }

    async fn release_publish(&self, key: &JobKey) -> Result<(), StoreError> {
        self.check()?;
        if let Some(Entry::Completed { lease_over, .. }) = self.entries.lock().unwrap().get_mut(key)
        {
            *lease_over = true;
        }
        Ok(())
    }

    async fn mark_published(&self, keys: &[JobKey]) -> Result<(), StoreError> {
        self.check()?;
        let mut entries = self.entries.lock().unwrap();
        for key in keys {
            entries.insert(key.clone(), Entry::Published);
        }
        Ok(())
    }
}

/// Routes set by the test; an organization without one uses the platform sender,
/// as one without an integration does.
#[derive(Default)]
pub struct FakeRoutes {
    pub routes: Mutex<HashMap<String, Route>>,
    pub down: AtomicBool,
    /// `(organization, reason)` of each integration marked `needs_reauth`.
    pub needs_reauth: Mutex<Vec<(String, String)>>,
    /// `(organization, until, reason)` of each pause shared with other replicas.
    pub pauses: Mutex<Vec<(String, DateTime<Utc>, String)>>,
}

impl FakeRoutes {
    pub fn set(&self, organization_id: &str, route: Route) {
        self.routes
            .lock()
            .unwrap()
            .insert(organization_id.to_owned(), route);
    }
}

#[async_trait]
impl Routes for FakeRoutes {
    async fn resolve(&self, organization_id: &str) -> Result<Route, StoreError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(unavailable());
        }
        Ok(self
            .routes
            .lock()
            .unwrap()
            .get(organization_id)
            .cloned()
            .unwrap_or(Route::Platform { on_behalf_of: None }))
    }

    async fn mark_needs_reauth(
        &self,
        organization_id: &str,
        reason: &str,
    ) -> Result<bool, StoreError> {
        let mut marked = self.needs_reauth.lock().unwrap();
        // Like the store: only the first mark of an integration changes it.
        let newly = !marked.iter().any(|(org, _)| org == organization_id);
        marked.push((organization_id.to_owned(), reason.to_owned()));
        Ok(newly)
    }

    async fn pause_mailbox(
        &self,
        organization_id: &str,
        until: DateTime<Utc>,
        reason: &str,
    ) -> Result<(), StoreError> {
        self.pauses
            .lock()
            .unwrap()
            .push((organization_id.to_owned(), until, reason.to_owned()));
        Ok(())
    }
}

/// One send the fake took.
#[derive(Clone, Debug)]
pub struct Sent {
    pub provider: ProviderKind,
    pub organization_id: String,
    pub message: OutgoingMessage,
}

/// Something that happens while a send is at the provider (a test's stand-in
/// for another delivery acting meanwhile).
pub type DuringSend = Box<dyn FnOnce() + Send>;

/// Answers each send with the next scripted outcome, or accepts it. One send is
/// one attempt: the in-process retries are the real senders' (`sender.rs`).
#[derive(Default)]
pub struct FakeSenders {
    pub script: Mutex<VecDeque<Result<Accepted, SendFailure>>>,
    pub sent: Mutex<Vec<Sent>>,
    /// Run once, during the next send.
    pub during_send: Mutex<Option<DuringSend>>,
}

impl FakeSenders {
    pub fn answer(&self, outcome: Result<Accepted, SendFailure>) {
        self.script.lock().unwrap().push_back(outcome);
    }

    pub fn sent(&self) -> Vec<Sent> {
        self.sent.lock().unwrap().clone()
    }
}

#[async_trait]
impl SendMail for FakeSenders {
    async fn send(
        &self,
        provider: ProviderKind,
        organization_id: &str,
        message: &OutgoingMessage,
        _retry: InProcessRetry,
        watch: &InFlight,
    ) -> SendReport {
        // As the real senders: the request is at the provider until an answer
        // says it was refused.
        watch.handed_to(provider);
        if let Some(during) = self.during_send.lock().unwrap().take() {
            during();
        }
        let mut sent = self.sent.lock().unwrap();
        sent.push(Sent {
            provider,
            organization_id: organization_id.to_owned(),
            message: message.clone(),
        });
        let outcome = self.script.lock().unwrap().pop_front().unwrap_or_else(|| {
            Ok(Accepted {
                provider_message_id: Some(format!("fake-{}", sent.len())),
            })
        });
        match &outcome {
            Ok(_) => {}
            Err(SendFailure::Send(e)) if e.maybe_sent => {}
            Err(_) => watch.refused(),
        }
        (outcome, 1, vec![])
    }
}

/// The mailboxes' fleet-wide slots, in memory: `limit` per mailbox (4, Graph's).
pub struct FakeSlots {
    pub limit: usize,
    held: Mutex<HashMap<String, Vec<i32>>>,
    /// Slots given back (released), over every mailbox.
    pub releases: std::sync::atomic::AtomicUsize,
}

impl Default for FakeSlots {
    fn default() -> Self {
        FakeSlots::with_limit(4)
    }
}

impl FakeSlots {
    pub fn with_limit(limit: usize) -> Self {
        FakeSlots {
            limit,
            held: Mutex::default(),
            releases: Default::default(),
        }
    }
}

#[async_trait]
impl MailboxSlots for FakeSlots {
    async fn acquire_mailbox_slot(
        &self,
        organization_id: &str,
        slots: usize,
        _lease: Duration,
    ) -> Result<Option<SlotLease>, StoreError> {
        let mut held = self.held.lock().unwrap();
        let taken = held.entry(organization_id.to_owned()).or_default();
        let free = (0..slots.min(self.limit) as i32).find(|s| !taken.contains(s));
        Ok(free.map(|s| {
            taken.push(s);
            SlotLease::new(organization_id, s, i64::from(s))
        }))
    }
    async fn extend_mailbox_slot(
        &self,
        _slot: &SlotLease,
        _lease: Duration,
    ) -> Result<bool, StoreError> {
        Ok(true)
    }
    async fn release_mailbox_slot(&self, slot: &SlotLease) -> Result<(), StoreError> {
        self.releases
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(taken) = self.held.lock().unwrap().get_mut(&slot.organization_id) {
            taken.retain(|s| *s != slot.slot);
        }
        Ok(())
    }
}
