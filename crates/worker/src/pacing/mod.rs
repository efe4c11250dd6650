//! Provider-aware pacing and tenant fairness: a job is admitted to the provider
//! only when its organization and mailbox have room; otherwise it is deferred (it
//! goes to a delay queue and holds no consumer slot).
//!
//! - **Fairness.** At most `org_max_in_flight` jobs of one organization are in
//!   flight in this worker, so one flooding organization leaves the rest of the
//!   capacity to everyone else.
//! - **Microsoft Graph** allows 4 concurrent requests per app and mailbox: at most
//!   `graph_mailbox_concurrency` sends per mailbox at once in this worker (with R
//!   replicas, set it to 4 / R).
//! - **Gmail** meters sends per user and minute: at most `gmail_mailbox_per_minute`
//!   per mailbox in this worker (a GCRA with a small burst).
//! - **429s** pause the mailbox for every replica: the pause is stored in
//!   PostgreSQL and announced by NOTIFY; until it ends, jobs are deferred without
//!   calling the provider.
//! - **Daily limits** (Exchange Online recipients per day, Google Workspace
//!   messages per day) are counted per mailbox and UTC day, summed over replicas
//!   through PostgreSQL (flushed in batches); a job the provider would refuse today
//!   is deferred, and fails with `quota_exceeded` only when its budget runs out.
//! - **Deferred jobs are scheduled, not just postponed.** Each organization has a
//!   queue of wake-up slots, spaced by the rate the pacer expects it to send at
//!   (its in-flight cap or mailbox cap over its mean send time, Gmail's rate, and
//!   after a 429 a learnt rate: what the provider accepted lately, or half the
//!   expected rate when nothing was, then grown by each accepted send).
//!   A deferred job gets the next slot, so a flood of 20,000 jobs comes back about
//!   as fast as its mailbox can take them instead of all at once every second: the
//!   work of cycling a backlog through the delay queues stays small, and other
//!   organizations' jobs do not queue behind it.
//! - **Memory is bounded.** Per-mailbox entries are dropped when they carry no
//!   information any more (see [`Pacer::prune`], run every few seconds).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, NaiveDate, Utc};
use mail_dispatch_domain::ProviderKind;
use mail_dispatch_store::Store;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Limits of the pacer (per worker unless said otherwise).
#[derive(Clone, Copy, Debug)]
pub struct PacingConfig {
    pub org_max_in_flight: usize,
    pub graph_mailbox_concurrency: usize,
    pub gmail_mailbox_per_minute: u32,
    /// Exchange Online: 10,000 recipients per day per mailbox (shared over replicas).
    pub microsoft_daily_recipients: u32,
    /// Google Workspace: 2,000 messages per day per user (shared over replicas).
    pub google_daily_messages: u32,
}

impl Default for PacingConfig {
    fn default() -> Self {
        PacingConfig {
            org_max_in_flight: 16,
            graph_mailbox_concurrency: 4,
            gmail_mailbox_per_minute: 60,
            microsoft_daily_recipients: 10_000,
            google_daily_messages: 2_000,
        }
    }
}

/// Why a job was deferred.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeferReason {
    /// Its organization has `org_max_in_flight` jobs in flight here.
    OrganizationBusy,
    /// Its mailbox has as many concurrent Graph sends as allowed.
    MailboxBusy,
    /// Its mailbox is at its per-minute rate.
    MailboxRate,
    /// The provider throttled the mailbox (429) until a known instant.
    MailboxPaused,
    /// The mailbox reached the provider's daily limit.
    DailyLimit,
}

impl DeferReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DeferReason::OrganizationBusy => "organization_busy",
            DeferReason::MailboxBusy => "mailbox_busy",
            DeferReason::MailboxRate => "mailbox_rate",
            DeferReason::MailboxPaused => "mailbox_paused",
            DeferReason::DailyLimit => "daily_limit",
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
    _mailbox_slot: Option<OwnedSemaphorePermit>,
    provider: ProviderKind,
    /// Units of today's limit reserved at admission; given back unless sent.
    daily_units: u32,
    sent: bool,
    admitted_at: Instant,
}

impl Permit {
    /// The provider accepted the message: its reservation counts for today.
    pub fn mark_sent(&mut self) {
        self.sent = true;
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let send_secs = self.admitted_at.elapsed().as_secs_f64();
        let mut s = self.pacer.state.lock().expect("poisoned");
        s.learn_send(&self.organization_id, self.provider, send_secs, self.sent);
        if !self.sent
            && self.daily_units > 0
            && let Some(d) = s.daily.get_mut(&self.organization_id)
        {
            d.unflushed = d.unflushed.saturating_sub(self.daily_units);
        }
        if let Some(n) = s.in_flight.get_mut(&self.organization_id) {
            *n -= 1;
            if *n == 0 {
                s.in_flight.remove(&self.organization_id);
            }
        }
    }
}

#[derive(Default)]
struct DailyCount {
    day: Option<NaiveDate>,
    /// Total of every replica at the last flush.
    shared: u32,
    /// Sent here since the last flush.
    unflushed: u32,
}

#[derive(Default)]
struct State {
    in_flight: HashMap<String, usize>,
    pauses: HashMap<String, DateTime<Utc>>,
    graph_slots: HashMap<String, Arc<Semaphore>>,
    /// Gmail: theoretical arrival time of the next send (GCRA).
    gmail_tat: HashMap<String, DateTime<Utc>>,
    daily: HashMap<String, DailyCount>,
    /// Deferral scheduling per organization.
    flows: HashMap<String, Flow>,
    /// Mean send time per provider over every organization (the prior of a new flow).
    provider_send_secs: [f64; 3],
}

/// What the pacer learnt of one organization's sending.
#[derive(Clone, Debug)]
struct Flow {
    /// The next free wake-up slot for a deferred job.
    next_slot: DateTime<Utc>,
    /// Mean duration of one send (exponentially weighted), seconds.
    send_secs: f64,
    /// Sends per second the provider accepts for this mailbox, learnt from 429s;
    /// `None` while no 429 limits it.
    accepted_rate: Option<f64>,
    /// When `accepted_rate` was last halved (at most once per second).
    last_throttle: Option<DateTime<Utc>>,
    /// Accepted sends counted since `window_start`, and the rate of the window before.
    window_start: Instant,
    window_accepted: u32,
    previous_window_rate: Option<f64>,
}

impl Flow {
    /// Sends per second the provider accepted lately, if any were counted. A window
    /// younger than a second counts as a second: two sends accepted in the first
    /// 100 ms say "2 per second", not "20".
    fn recent_accepted_rate(&self) -> Option<f64> {
        let elapsed = self.window_start.elapsed().as_secs_f64();
        let current =
            (self.window_accepted > 0).then(|| f64::from(self.window_accepted) / elapsed.max(1.0));
        match (current, self.previous_window_rate) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }
}

/// Weight of the newest sample in the send-time averages.
const EWMA_WEIGHT: f64 = 0.1;
/// The learnt rate never goes below this (sends per second).
const MIN_RATE: f64 = 0.2;
/// Growth of the learnt rate per accepted send.
const RATE_GROWTH: f64 = 1.05;
/// The prior mean send time before anything was measured.
const DEFAULT_SEND_SECS: f64 = 0.25;

fn provider_index(p: ProviderKind) -> usize {
    match p {
        ProviderKind::Microsoft => 0,
        ProviderKind::Google => 1,
        ProviderKind::Default => 2,
    }
}

impl State {
    fn flow(&mut self, org: &str, provider: ProviderKind, now: DateTime<Utc>) -> &mut Flow {
        if !self.flows.contains_key(org) {
            // Looked up first: this runs for every admitted job, and `entry` would
            // allocate the key each time.
            self.flows
                .insert(org.to_owned(), self.new_flow(provider, now));
        }
        self.flows.get_mut(org).expect("just inserted")
    }

    fn new_flow(&self, provider: ProviderKind, now: DateTime<Utc>) -> Flow {
        let prior = self.provider_send_secs[provider_index(provider)];
        Flow {
            next_slot: now,
            send_secs: prior,
            accepted_rate: None,
            last_throttle: None,
            window_start: Instant::now(),
            window_accepted: 0,
            previous_window_rate: None,
        }
    }

    fn learn_send(&mut self, org: &str, provider: ProviderKind, secs: f64, accepted: bool) {
        let global = &mut self.provider_send_secs[provider_index(provider)];
        *global += EWMA_WEIGHT * (secs - *global);
        if let Some(flow) = self.flows.get_mut(org) {
            flow.send_secs += EWMA_WEIGHT * (secs - flow.send_secs);
            if accepted {
                let window = flow.window_start.elapsed().as_secs_f64();
                if window >= 1.0 {
                    flow.previous_window_rate = Some(f64::from(flow.window_accepted) / window);
                    flow.window_start = Instant::now();
                    flow.window_accepted = 0;
                }
                flow.window_accepted += 1;
                if let Some(rate) = flow.accepted_rate.as_mut() {
                    // Bounded: past any expected rate it no longer limits anything.
                    *rate = (*rate * RATE_GROWTH).min(1e6);
                }
            }
        }
    }
}

/// The pacer of one worker.
pub struct Pacer {
    config: PacingConfig,
    state: Mutex<State>,
}

impl std::fmt::Debug for Pacer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pacer")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// How soon a deferred organization-busy or mailbox-busy job is tried again.
const BUSY_RETRY: Duration = Duration::from_secs(1);
/// Gmail's burst allowance, as a share of a minute.
const GMAIL_BURST: Duration = Duration::from_secs(5);

fn next_utc_midnight(now: DateTime<Utc>) -> DateTime<Utc> {
    let tomorrow = now.date_naive().succ_opt().unwrap_or(now.date_naive());
    tomorrow
        .and_hms_opt(0, 0, 0)
        .expect("midnight exists")
        .and_utc()
}

impl Pacer {
    pub fn new(config: PacingConfig) -> Arc<Self> {
        Arc::new(Pacer {
            config,
            state: Mutex::new(State {
                provider_send_secs: [DEFAULT_SEND_SECS; 3],
                ..State::default()
            }),
        })
    }

    /// Sends per second this organization is expected to manage through `provider`.
    fn expected_rate(&self, flow: &Flow, provider: ProviderKind) -> f64 {
        let c = &self.config;
        let parallel = match provider {
            ProviderKind::Microsoft => c.org_max_in_flight.min(c.graph_mailbox_concurrency),
            _ => c.org_max_in_flight,
        }
        .max(1) as f64;
        let mut rate = parallel / flow.send_secs.max(1e-4);
        if provider == ProviderKind::Google {
            rate = rate.min(f64::from(c.gmail_mailbox_per_minute.max(1)) / 60.0);
        }
        if let Some(accepted) = flow.accepted_rate {
            rate = rate.min(accepted);
        }
        rate.max(MIN_RATE)
    }

    /// Gives a deferred job of `org` its wake-up slot: not before `until`, and
    /// after the jobs of `org` deferred before it, one expected send time apart.
    fn schedule(
        &self,
        s: &mut State,
        org: &str,
        provider: ProviderKind,
        until: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> DateTime<Utc> {
        let flow = s.flow(org, provider, now).clone();
        let spacing =
            chrono::Duration::microseconds((1e6 / self.expected_rate(&flow, provider)) as i64);
        let wake = until.max(flow.next_slot);
        s.flows.get_mut(org).expect("just inserted").next_slot = wake + spacing;
        wake
    }

    /// The provider throttled `org`'s mailbox (a 429): its learnt rate becomes the
    /// rate the provider accepted lately, or half the expected rate when nothing
    /// was accepted lately (at most once a second, since one burst brings several
    /// 429s at once). Not halving what was measured: 429s that follow are mostly
    /// from jobs scheduled at the old rate, and would drive the rate to the floor.
    pub fn throttled(&self, org: &str, provider: ProviderKind, now: DateTime<Utc>) {
        let mut s = self.state.lock().expect("poisoned");
        let flow = s.flow(org, provider, now).clone();
        if flow
            .last_throttle
            .is_some_and(|t| now - t < chrono::Duration::seconds(1))
        {
            return;
        }
        let expected = self.expected_rate(&flow, provider);
        let halved = match flow.recent_accepted_rate() {
            Some(accepted) => accepted.min(expected),
            None => expected / 2.0,
        }
        .max(MIN_RATE);
        let flow = s.flows.get_mut(org).expect("just inserted");
        flow.accepted_rate = Some(halved);
        flow.last_throttle = Some(now);
    }

    /// Drops what carries no information any more, so memory stays bounded by the
    /// organizations active recently rather than by every organization ever seen:
    /// ended pauses, Gmail rate entries already in the past, idle Graph slots,
    /// daily counts of other days (and, past `max_daily_entries`, those far below
    /// their limit: the next flush brings back the shared total of a mailbox that
    /// sends again), and flows with no slot ahead whose learnt rate has recovered
    /// or is older than ten minutes.
    pub fn prune(&self, now: DateTime<Utc>, max_daily_entries: usize) {
        let c = self.config;
        let mut s = self.state.lock().expect("poisoned");
        s.pauses.retain(|_, until| *until > now);
        s.gmail_tat.retain(|_, tat| *tat > now);
        s.graph_slots
            .retain(|_, slots| Arc::strong_count(slots) > 1);
        let today = now.date_naive();
        s.daily
            .retain(|_, d| d.unflushed > 0 || d.day == Some(today));
        if s.daily.len() > max_daily_entries {
            let far_below = c.google_daily_messages.min(c.microsoft_daily_recipients) / 2;
            s.daily
                .retain(|_, d| d.unflushed > 0 || d.shared >= far_below);
        }
        let stale = chrono::Duration::minutes(10);
        s.flows.retain(|_, f| {
            f.next_slot > now
                || f.last_throttle
                    .is_some_and(|t| f.accepted_rate.is_some() && now - t < stale)
        });
    }

    /// How many entries the pacer holds (for tests and the memory bound).
    pub fn entries(&self) -> usize {
        let s = self.state.lock().expect("poisoned");
        s.in_flight.len()
            + s.pauses.len()
            + s.graph_slots.len()
            + s.gmail_tat.len()
            + s.daily.len()
            + s.flows.len()
    }

    /// Asks to send one message of `org` through `provider` to `recipients` recipients.
    pub fn admit(
        self: &Arc<Self>,
        org: &str,
        provider: ProviderKind,
        recipients: usize,
        now: DateTime<Utc>,
    ) -> Admission {
        let mut s = self.state.lock().expect("poisoned");
        match self.admit_locked(&mut s, org, provider, recipients, now) {
            Admission::Defer { until, reason } => Admission::Defer {
                until: self.schedule(&mut s, org, provider, until, now),
                reason,
            },
            go => go,
        }
    }

    fn admit_locked(
        self: &Arc<Self>,
        s: &mut State,
        org: &str,
        provider: ProviderKind,
        recipients: usize,
        now: DateTime<Utc>,
    ) -> Admission {
        let c = &self.config;
        let busy = |reason| Admission::Defer {
            until: now + chrono::Duration::from_std(BUSY_RETRY).expect("small"),
            reason,
        };
        if s.in_flight.get(org).copied().unwrap_or(0) >= c.org_max_in_flight.max(1) {
            return busy(DeferReason::OrganizationBusy);
        }
        if provider != ProviderKind::Default {
            if let Some(until) = s.pauses.get(org).copied() {
                if until > now {
                    return Admission::Defer {
                        until,
                        reason: DeferReason::MailboxPaused,
                    };
                }
                s.pauses.remove(org);
            }
            let (limit, units) = match provider {
                ProviderKind::Microsoft => (c.microsoft_daily_recipients, recipients as u32),
                _ => (c.google_daily_messages, 1),
            };
            let today = now.date_naive();
            let daily = s.daily.entry(org.to_owned()).or_default();
            if daily.day != Some(today) {
                *daily = DailyCount {
                    day: Some(today),
                    ..DailyCount::default()
                };
            }
            if daily.shared + daily.unflushed + units > limit {
                return Admission::Defer {
                    until: next_utc_midnight(now),
                    reason: DeferReason::DailyLimit,
                };
            }
        }
        // Reserved now (so concurrent jobs cannot overshoot), given back if not sent.
        let daily_units = match provider {
            ProviderKind::Microsoft => recipients as u32,
            ProviderKind::Google => 1,
            ProviderKind::Default => 0,
        };
        let mailbox_slot = match provider {
            ProviderKind::Microsoft => {
                let slots = s
                    .graph_slots
                    .entry(org.to_owned())
                    .or_insert_with(|| Arc::new(Semaphore::new(c.graph_mailbox_concurrency.max(1))))
                    .clone();
                match slots.try_acquire_owned() {
                    Ok(p) => Some(p),
                    Err(_) => return busy(DeferReason::MailboxBusy),
                }
            }
            ProviderKind::Google => {
                let interval = chrono::Duration::milliseconds(
                    60_000 / i64::from(c.gmail_mailbox_per_minute.max(1)),
                );
                let burst = chrono::Duration::from_std(GMAIL_BURST).expect("small");
                let tat = s.gmail_tat.get(org).copied().unwrap_or(now).max(now);
                if tat - now > burst {
                    return Admission::Defer {
                        until: tat - burst,
                        reason: DeferReason::MailboxRate,
                    };
                }
                s.gmail_tat.insert(org.to_owned(), tat + interval);
                None
            }
            ProviderKind::Default => None,
        };
        *s.in_flight.entry(org.to_owned()).or_default() += 1;
        if daily_units > 0 {
            s.daily.entry(org.to_owned()).or_default().unflushed += daily_units;
        }
        s.flow(org, provider, now);
        Admission::Go(Permit {
            pacer: Arc::clone(self),
            organization_id: org.to_owned(),
            _mailbox_slot: mailbox_slot,
            provider,
            daily_units,
            sent: false,
            admitted_at: Instant::now(),
        })
    }

    /// A pause learnt from a 429 here or from another replica.
    pub fn apply_pause(&self, org: &str, until: DateTime<Utc>) {
        let mut s = self.state.lock().expect("poisoned");
        let entry = s.pauses.entry(org.to_owned()).or_insert(until);
        if *entry < until {
            *entry = until;
        }
    }

    /// Writes this worker's counts since the last flush and reads back the totals.
    pub async fn flush_daily(&self, store: &Store) {
        let pending: Vec<(String, NaiveDate, i32)> = {
            let mut s = self.state.lock().expect("poisoned");
            s.daily
                .iter_mut()
                .filter(|(_, d)| d.unflushed > 0)
                .filter_map(|(org, d)| {
                    let n = std::mem::take(&mut d.unflushed);
                    d.day.map(|day| (org.clone(), day, n as i32))
                })
                .collect()
        };
        if pending.is_empty() {
            return;
        }
        match store.add_daily_counts(&pending).await {
            Ok(totals) => {
                let mut s = self.state.lock().expect("poisoned");
                for (org, day, total) in totals {
                    let d = s.daily.entry(org).or_default();
                    if d.day == Some(day) {
                        d.shared = total.max(0) as u32;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not flush daily sending counts; keeping them for the next flush");
                let mut s = self.state.lock().expect("poisoned");
                for (org, day, n) in pending {
                    let d = s.daily.entry(org).or_default();
                    if d.day == Some(day) {
                        d.unflushed += n as u32;
                    }
                }
            }
        }
    }

    /// Loads the pauses still running (at start: notifications sent before were missed).
    pub async fn load_pauses(&self, store: &Store) {
        if let Ok(pauses) = store.active_pauses().await {
            for (org, until) in pauses {
                self.apply_pause(&org, until);
            }
        }
    }
}

#[cfg(test)]
mod tests;
