//! Provider-aware pacing and tenant fairness: a job is admitted to the provider
//! only when its organization and mailbox have room; otherwise it is deferred (it
//! goes to a delay queue and holds no consumer slot).
//!
//! - **Fairness.** At most `org_max_in_flight` jobs of one organization are in
//!   flight in this worker, so one flooding organization leaves the rest of the
//!   capacity to everyone else.
//! - **Microsoft Graph** allows 4 concurrent requests per app and mailbox,
//!   whatever the number of replicas: at most `graph_mailbox_concurrency` sends
//!   per mailbox at once over all replicas, through slot leases in PostgreSQL
//!   (`fleet`), and never more than that in this worker (a semaphore, taken
//!   first so that a busy worker does not ask the database). An admitted Graph
//!   job waits a moment for those slots (a freed fleet-wide slot is announced by
//!   NOTIFY) and is deferred only if the mailbox stays full.
//! - **Gmail** meters sends per user and minute: at most `gmail_mailbox_per_minute`
//!   per mailbox in this worker (a GCRA with a small burst).
//! - **429s** pause the mailbox for every replica: the pause is stored in
//!   PostgreSQL and announced by NOTIFY; until it ends, jobs are deferred without
//!   calling the provider. Gmail's per-project quota (`rateLimitExceeded`) is
//!   shared by every Google organization of the deployment (one OAuth client, one
//!   Google Cloud project): its 429 pauses them all, stored and announced the
//!   same way under [`GOOGLE_PROJECT`].
//! - **Sending limits over a rolling 24 hours**, as the providers count them
//!   (Exchange Online: recipients per mailbox; Google: messages, recipients and
//!   external recipients per user, lower for consumer accounts), scaled by the
//!   organization's share (`limit_percent`), are counted per mailbox in short
//!   time buckets summed over replicas through PostgreSQL (flushed in batches);
//!   a job the provider would refuse is deferred until the oldest counted sends
//!   leave the window, and fails with `quota_exceeded` only when its budget runs
//!   out.
//! - **Deferred jobs are scheduled, not just postponed.** Each organization has a
//!   queue of wake-up slots, spaced by the rate the pacer expects it to send at
//!   (its in-flight cap or mailbox cap over its mean send time, Gmail's rate, and
//!   after a 429 a learnt rate: what the provider accepted lately, or half the
//!   expected rate when nothing was, then grown by each accepted send).
//!   A deferred job gets the next slot, so a flood comes back about as fast as its
//!   mailbox can take them instead of all at once every second: the work of
//!   cycling a backlog through the delay queues stays small, and other
//!   organizations' jobs do not queue behind it.
//! - **Memory is bounded.** Per-mailbox entries are dropped when they carry no
//!   information any more (see [`Pacer::prune`], run every few seconds).
//!
//! Everything the pacer knows of one organization is one `OrgPacing`, and all of
//! them sit in one map behind one mutex, so an admission, a release or a prune
//! looks the organization up once and cannot leave its pieces out of step. The
//! pieces are split by concern:
//!
//! - `limits`: the checks an admission must pass and the room it takes;
//! - `schedule`: what is learnt of an organization's sending, and the wake-up
//!   slots of its deferred jobs;
//! - `sync`: sharing pauses and window counts with the other replicas through
//!   PostgreSQL;
//! - `fleet`: Graph's per-mailbox slots shared by the replicas (PostgreSQL leases).
//!
//! Only `sync` and `fleet` know the store.

mod fleet;
mod limits;
mod schedule;
mod sync;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use mail_dispatch_domain::ProviderKind;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use fleet::SlotWaiters;
pub use fleet::{FLEET_SLOT_WAIT, FleetSlot, SLOT_LEASE};
pub use limits::Counter;
use limits::WindowCounts;
use schedule::{Flow, SendTimes};

/// Limits of the pacer (per worker unless said otherwise).
#[derive(Clone, Copy, Debug)]
pub struct PacingConfig {
    pub org_max_in_flight: usize,
    /// Concurrent Graph sends per mailbox over all replicas (Graph: 4 per app
    /// and mailbox).
    pub graph_mailbox_concurrency: usize,
    pub gmail_mailbox_per_minute: u32,
    /// Exchange Online: 10,000 recipients per mailbox per rolling 24 h (shared
    /// over replicas).
    pub microsoft_daily_recipients: u32,
    /// Google Workspace: 2,000 messages per user per rolling 24 h.
    pub google_daily_messages: u32,
    /// Google Workspace: 10,000 recipients per user per rolling 24 h.
    pub google_daily_recipients: u32,
    /// Google Workspace: 3,000 unique recipients per user per rolling 24 h.
    /// Each recipient of each message is counted (unique or not: never fewer
    /// than Google counts), so the recipients counter holds the lower of this
    /// and `google_daily_recipients`.
    pub google_daily_unique_recipients: u32,
    /// Google Workspace: external recipients per user per rolling 24 h: 2,000,
    /// the lower of Google's 3,000 external and 2,000 unique external (each
    /// external recipient is counted, unique or not: never fewer than Google).
    pub google_daily_external_recipients: u32,
    /// Consumer Google accounts (no Workspace domain): 500 messages per 24 h.
    pub google_consumer_daily_messages: u32,
    /// Consumer Google accounts: 500 recipients (and external recipients) per 24 h.
    pub google_consumer_daily_recipients: u32,
    /// Google Workspace trial accounts: 500 messages per 24 h.
    pub google_trial_daily_messages: u32,
    /// Google Workspace trial accounts: 500 (unique) external recipients per 24 h.
    pub google_trial_daily_external_recipients: u32,
    /// The providers' window: 24 hours (shorter only in tests).
    pub window: Duration,
}

impl Default for PacingConfig {
    fn default() -> Self {
        PacingConfig {
            org_max_in_flight: 16,
            graph_mailbox_concurrency: 4,
            gmail_mailbox_per_minute: 60,
            microsoft_daily_recipients: 10_000,
            google_daily_messages: 2_000,
            google_daily_recipients: 10_000,
            google_daily_unique_recipients: 3_000,
            google_daily_external_recipients: 2_000,
            google_consumer_daily_messages: 500,
            google_consumer_daily_recipients: 500,
            google_trial_daily_messages: 500,
            google_trial_daily_external_recipients: 500,
            window: LIMIT_WINDOW,
        }
    }
}

/// The window both providers count their daily limits over.
pub const LIMIT_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// What the provider limits of an organization's mailbox depend on besides the
/// provider.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SendingBudget {
    /// A consumer Google account (no Workspace domain, `hd`): lower limits.
    pub consumer: bool,
    /// A Google Workspace account on a trial, as its organization says: lower
    /// limits.
    pub trial: bool,
    /// The share (percent, 1–100) of the limits the organization lets us use.
    pub limit_percent: u8,
}

impl Default for SendingBudget {
    fn default() -> Self {
        SendingBudget {
            consumer: false,
            trial: false,
            limit_percent: 100,
        }
    }
}

/// What one message counts against the rolling-window limits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Demand {
    pub recipients: u32,
    /// Recipients outside the sender's domain.
    pub external_recipients: u32,
}

impl Demand {
    /// The recipients of a message from `sender_domain`: those of another domain
    /// are external (Google: "outside your primary domain"; an alias or second
    /// domain of the same organization is counted external, which only errs on
    /// the safe side).
    pub fn of<'a>(sender_domain: &str, recipient_domains: impl Iterator<Item = &'a str>) -> Demand {
        let mut d = Demand::default();
        for domain in recipient_domains {
            d.recipients += 1;
            if !domain.eq_ignore_ascii_case(sender_domain) {
                d.external_recipients += 1;
            }
        }
        d
    }
}

/// Why a job was deferred.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeferReason {
    /// Its organization has `org_max_in_flight` jobs in flight here.
    OrganizationBusy,
    /// Its mailbox has as many concurrent Graph sends as allowed (here or over
    /// all replicas).
    MailboxBusy,
    /// Its mailbox is at its per-minute rate.
    MailboxRate,
    /// The provider throttled the mailbox (429) until a known instant.
    MailboxPaused,
    /// The mailbox reached one of the provider's limits over the rolling 24 hours.
    DailyLimit,
    /// The provider throttled the whole project (Gmail's per-project quota):
    /// every Google organization waits.
    ProjectPaused,
}

impl DeferReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DeferReason::OrganizationBusy => "organization_busy",
            DeferReason::MailboxBusy => "mailbox_busy",
            DeferReason::MailboxRate => "mailbox_rate",
            DeferReason::MailboxPaused => "mailbox_paused",
            DeferReason::DailyLimit => "daily_limit",
            DeferReason::ProjectPaused => "project_paused",
        }
    }
}

/// The outcome of asking to send.
#[derive(Debug)]
pub enum Admission {
    /// Go ahead; hold the permit until the send is over.
    Go(Permit),
    /// Not now: try again at `until`.
    Defer {
        until: DateTime<Utc>,
        reason: DeferReason,
    },
}

/// Room taken by an admitted job; released on drop.
#[derive(Debug)]
pub struct Permit {
    pacer: Arc<Pacer>,
    organization_id: String,
    /// For Graph: the mailbox's semaphore in this worker, until one of its
    /// permits is taken (`mailbox_slot`).
    graph_mailbox: Option<Arc<Semaphore>>,
    mailbox_slot: Option<OwnedSemaphorePermit>,
    /// The mailbox's fleet-wide Graph slot, while the send runs (boxed: it
    /// carries a store handle, and most permits have none).
    fleet_slot: Option<Box<FleetSlot>>,
    provider: ProviderKind,
    /// Units of the window limits reserved at admission; given back unless sent.
    window_units: [u32; 3],
    sent: bool,
    admitted_at: Instant,
    /// Whether its time is a send's, for the schedule to learn from (not when
    /// it only waited for a mailbox that stayed full).
    timed_a_send: bool,
}

impl Permit {
    /// The provider accepted the message: its reservation counts for the window.
    pub fn mark_sent(&mut self) {
        self.sent = true;
    }

    /// The send is over: its mailbox's slots go back at once, for the other
    /// jobs of this worker and the other replicas, before the outcome is
    /// recorded and published.
    pub fn release_mailbox_slots(&mut self) {
        self.mailbox_slot = None;
        if let Some(slot) = self.fleet_slot.take() {
            self.pacer
                .give_back_fleet_slot(&self.organization_id, *slot);
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let send_secs = self.admitted_at.elapsed().as_secs_f64();
        let mut s = self.pacer.state();
        if self.timed_a_send {
            s.send_times.learn(self.provider, send_secs);
        }
        let org = &self.organization_id;
        // Present: an organization with a job in flight is never pruned.
        if let Some(o) = s.orgs.get_mut(org) {
            if let Some(flow) = o.flow.as_mut()
                && self.timed_a_send
            {
                flow.learn_send(send_secs, self.sent);
            }
            o.release(self.window_units, self.sent);
            if o.holds_nothing() {
                s.orgs.remove(org);
            }
        }
    }
}

/// Everything the pacer knows of one organization (and its mailbox). A piece that
/// is `None` (or an in-flight count of 0) carries no information; the organization
/// is forgotten once every piece is.
#[derive(Default)]
struct OrgPacing {
    /// Jobs of the organization admitted here and not yet over.
    in_flight: usize,
    /// A 429 pause, from this replica or another one.
    pause: Option<DateTime<Utc>>,
    /// Graph: the mailbox's concurrent sends.
    graph_slots: Option<Arc<Semaphore>>,
    /// Gmail: theoretical arrival time of the next send (GCRA).
    gmail_tat: Option<DateTime<Utc>>,
    /// The rolling-window counts.
    window: Option<WindowCounts>,
    /// Deferral scheduling.
    flow: Option<Flow>,
}

impl OrgPacing {
    fn holds_nothing(&self) -> bool {
        self.in_flight == 0
            && self.pause.is_none()
            && self.graph_slots.is_none()
            && self.gmail_tat.is_none()
            && self.window.is_none()
            && self.flow.is_none()
    }

    /// Drops the pieces that carry no information any more at `now`; daily counts
    /// below `daily_floor` too, when given (see [`Pacer::prune`]).
    fn prune(&mut self, now: DateTime<Utc>, daily_floor: Option<u32>) {
        self.prune_limits(now, daily_floor);
        if self.flow.as_ref().is_some_and(|f| !f.still_matters(now)) {
            self.flow = None;
        }
    }
}

/// The key under which a pause of the whole Google project is shared with the
/// other replicas, in place of an organization id. Organization ids never hold
/// control characters (`Job` refuses them), so it names no organization.
pub const GOOGLE_PROJECT: &str = "\u{1}google-project";

/// A project-wide pause lasts at least this long: Google counts its project
/// quota per minute and gives no time to retry at, so the project waits a
/// little for its quota to refill rather than every organization testing it.
pub const PROJECT_PAUSE_FLOOR: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Default)]
struct State {
    orgs: HashMap<String, OrgPacing>,
    /// A pause of every Google organization (Gmail's per-project quota), from
    /// this replica or another one.
    google_project_pause: Option<DateTime<Utc>>,
    /// Mean send time per provider over every organization (the prior of a new flow).
    send_times: SendTimes,
}

impl State {
    fn org_mut(&mut self, org: &str) -> &mut OrgPacing {
        if !self.orgs.contains_key(org) {
            // Looked up first: this runs for every admitted job, and `entry` would
            // allocate the key each time.
            self.orgs.insert(org.to_owned(), OrgPacing::default());
        }
        self.orgs.get_mut(org).expect("just inserted")
    }

    fn flow_mut(&mut self, org: &str, provider: ProviderKind, now: DateTime<Utc>) -> &mut Flow {
        let prior = self.send_times.prior(provider);
        self.org_mut(org)
            .flow
            .get_or_insert_with(|| Flow::new(prior, now))
    }
}

/// How many pieces of each kind the pacer holds.
#[derive(Debug, Default)]
struct Held {
    in_flight: usize,
    pauses: usize,
    graph_slots: usize,
    gmail_tats: usize,
    daily_counts: usize,
    flows: usize,
}

impl Held {
    fn total(&self) -> usize {
        self.in_flight
            + self.pauses
            + self.graph_slots
            + self.gmail_tats
            + self.daily_counts
            + self.flows
    }
}

/// The pacer of one worker.
pub struct Pacer {
    config: PacingConfig,
    state: Mutex<State>,
    /// Jobs waiting for one of their mailbox's fleet-wide slots.
    slot_waiters: SlotWaiters,
}

impl std::fmt::Debug for Pacer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pacer")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Pacer {
    pub fn new(config: PacingConfig) -> Arc<Self> {
        Arc::new(Pacer {
            config,
            state: Mutex::new(State::default()),
            slot_waiters: SlotWaiters::default(),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("poisoned")
    }

    /// Asks to send one message of `org` through `provider` to `recipients`
    /// recipients of its own domain, from a Workspace mailbox with its whole budget.
    pub fn admit(
        self: &Arc<Self>,
        org: &str,
        provider: ProviderKind,
        recipients: usize,
        now: DateTime<Utc>,
    ) -> Admission {
        let demand = Demand {
            recipients: recipients as u32,
            external_recipients: 0,
        };
        self.admit_message(org, provider, demand, SendingBudget::default(), now)
    }

    /// Asks to send one message of `org` through `provider` that counts `demand`
    /// against a mailbox of kind and share `budget`.
    pub fn admit_message(
        self: &Arc<Self>,
        org: &str,
        provider: ProviderKind,
        demand: Demand,
        budget: SendingBudget,
        now: DateTime<Utc>,
    ) -> Admission {
        let mut s = self.state();
        if provider == ProviderKind::Google {
            match s.google_project_pause {
                Some(until) if until > now => {
                    return Admission::Defer {
                        until: s.flow_mut(org, provider, now).wake_slot(
                            &self.config,
                            provider,
                            until,
                        ),
                        reason: DeferReason::ProjectPaused,
                    };
                }
                Some(_) => s.google_project_pause = None,
                None => {}
            }
        }
        match s
            .org_mut(org)
            .reserve(&self.config, provider, demand, budget, now)
        {
            Ok(room) => {
                // Created now so that the job's send time, measured on release,
                // has a flow to teach.
                s.flow_mut(org, provider, now);
                Admission::Go(Permit {
                    pacer: Arc::clone(self),
                    organization_id: org.to_owned(),
                    graph_mailbox: room.graph_mailbox,
                    mailbox_slot: None,
                    fleet_slot: None,
                    provider,
                    window_units: room.window_units,
                    sent: false,
                    admitted_at: Instant::now(),
                    timed_a_send: true,
                })
            }
            Err(refusal) => Admission::Defer {
                until: s.flow_mut(org, provider, now).wake_slot(
                    &self.config,
                    provider,
                    refusal.until,
                ),
                reason: refusal.reason,
            },
        }
    }

    /// A pause learnt from a 429 here or from another replica: of one
    /// organization's mailbox, or (`org` is [`GOOGLE_PROJECT`]) of every Google
    /// organization. Pauses only grow; see [`Pacer::lift_pause`].
    pub fn apply_pause(&self, org: &str, until: DateTime<Utc>) {
        let mut s = self.state();
        let pause = if org == GOOGLE_PROJECT {
            &mut s.google_project_pause
        } else {
            &mut s.org_mut(org).pause
        };
        if pause.is_none_or(|p| p < until) {
            *pause = Some(until);
        }
    }

    /// Ends `org`'s pause now (the admin's test send went out, see
    /// `Store::lift_mailbox_pause`).
    pub fn lift_pause(&self, org: &str) {
        let mut s = self.state();
        if org == GOOGLE_PROJECT {
            s.google_project_pause = None;
        } else if let Some(o) = s.orgs.get_mut(org) {
            o.pause = None;
        }
    }

    /// The end of `org`'s mailbox pause, if it has one.
    pub fn pause_of(&self, org: &str) -> Option<DateTime<Utc>> {
        self.state().orgs.get(org)?.pause
    }

    /// Drops what carries no information any more, so memory stays bounded by the
    /// organizations active recently rather than by every organization ever seen:
    /// ended pauses, Gmail rate entries already in the past, idle Graph slots,
    /// window counts with nothing counted (and, past `max_daily_entries`, those far below
    /// their limit: the next flush brings back the shared total of a mailbox that
    /// sends again), and flows with no slot ahead whose learnt rate has recovered
    /// or is older than ten minutes. An organization left with nothing is
    /// forgotten.
    pub fn prune(&self, now: DateTime<Utc>, max_daily_entries: usize) {
        let c = self.config;
        let mut s = self.state();
        if s.google_project_pause.is_some_and(|until| until <= now) {
            s.google_project_pause = None;
        }
        // Counted before the retain: whether to trim depends on how many window
        // counts there are over every organization.
        let current_daily = s
            .orgs
            .values()
            .filter(|o| o.window.as_ref().is_some_and(|w| !w.is_empty()))
            .count();
        let daily_floor = (current_daily > max_daily_entries)
            .then(|| c.google_daily_messages.min(c.microsoft_daily_recipients) / 2);
        s.orgs.retain(|_, o| {
            o.prune(now, daily_floor);
            !o.holds_nothing()
        });
        drop(s);
        self.slot_waiters.prune();
    }

    /// How many entries the pacer holds (for tests and the memory bound).
    pub fn entries(&self) -> usize {
        self.held().total()
    }

    fn held(&self) -> Held {
        let s = self.state();
        s.orgs.values().fold(Held::default(), |mut h, o| {
            h.in_flight += usize::from(o.in_flight > 0);
            h.pauses += usize::from(o.pause.is_some());
            h.graph_slots += usize::from(o.graph_slots.is_some());
            h.gmail_tats += usize::from(o.gmail_tat.is_some());
            h.daily_counts += usize::from(o.window.is_some());
            h.flows += usize::from(o.flow.is_some());
            h
        })
    }
}

/// Views of the state for the unit tests, so that they need not know its layout.
#[cfg(test)]
impl Pacer {
    /// The organizations with a pause, ended or not.
    fn paused_organizations(&self) -> Vec<String> {
        let s = self.state();
        s.orgs
            .iter()
            .filter(|(_, o)| o.pause.is_some())
            .map(|(org, _)| org.clone())
            .collect()
    }

    /// The sending rate learnt for `org` after a 429.
    fn learnt_rate(&self, org: &str) -> Option<f64> {
        self.state().orgs.get(org)?.flow.as_ref()?.learnt_rate()
    }

    /// Zeroes every count not yet flushed, as if they had all been written.
    fn forget_unflushed_daily_counts(&self) {
        for o in self.state().orgs.values_mut() {
            if let Some(counts) = o.window.as_mut() {
                for w in counts.0.iter_mut() {
                    w.unflushed = 0;
                }
            }
        }
    }
}
