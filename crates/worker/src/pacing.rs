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

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
    /// Units of today's limit reserved at admission; given back unless sent.
    daily_units: u32,
    sent: bool,
}

impl Permit {
    /// The provider accepted the message: its reservation counts for today.
    pub fn mark_sent(&mut self) {
        self.sent = true;
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut s = self.pacer.state.lock().expect("poisoned");
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
            state: Mutex::new(State::default()),
        })
    }

    /// Asks to send one message of `org` through `provider` to `recipients` recipients.
    pub fn admit(
        self: &Arc<Self>,
        org: &str,
        provider: ProviderKind,
        recipients: usize,
        now: DateTime<Utc>,
    ) -> Admission {
        let c = &self.config;
        let mut s = self.state.lock().expect("poisoned");
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
        Admission::Go(Permit {
            pacer: Arc::clone(self),
            organization_id: org.to_owned(),
            _mailbox_slot: mailbox_slot,
            daily_units,
            sent: false,
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
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 28, 10, 0, 0).unwrap()
    }

    fn config() -> PacingConfig {
        PacingConfig {
            org_max_in_flight: 3,
            graph_mailbox_concurrency: 2,
            gmail_mailbox_per_minute: 60,
            microsoft_daily_recipients: 10,
            google_daily_messages: 2,
        }
    }

    fn go(a: Admission) -> Permit {
        match a {
            Admission::Go(p) => p,
            Admission::Defer { reason, .. } => panic!("deferred: {reason:?}"),
        }
    }

    fn reason(a: Admission) -> DeferReason {
        match a {
            Admission::Go(_) => panic!("admitted"),
            Admission::Defer { reason, .. } => reason,
        }
    }

    #[test]
    fn an_organization_gets_at_most_its_share_and_others_are_unaffected() {
        let p = Pacer::new(config());
        let held: Vec<_> = (0..3)
            .map(|_| go(p.admit("a", ProviderKind::Default, 1, now())))
            .collect();
        assert_eq!(
            reason(p.admit("a", ProviderKind::Default, 1, now())),
            DeferReason::OrganizationBusy
        );
        go(p.admit("b", ProviderKind::Default, 1, now()));
        drop(held);
        go(p.admit("a", ProviderKind::Default, 1, now()));
    }

    #[test]
    fn graph_sends_per_mailbox_are_capped() {
        let p = Pacer::new(config());
        let a = go(p.admit("m", ProviderKind::Microsoft, 1, now()));
        let _b = go(p.admit("m", ProviderKind::Microsoft, 1, now()));
        assert_eq!(
            reason(p.admit("m", ProviderKind::Microsoft, 1, now())),
            DeferReason::MailboxBusy
        );
        drop(a);
        go(p.admit("m", ProviderKind::Microsoft, 1, now()));
    }

    #[test]
    fn gmail_sends_per_mailbox_follow_the_rate_after_a_small_burst() {
        let p = Pacer::new(config());
        // 60 per minute = one per second, with 5 s of burst.
        let admitted = (0..10)
            .take_while(|_| {
                matches!(
                    p.admit("g", ProviderKind::Google, 1, now()),
                    Admission::Go(_)
                )
            })
            .count();
        assert_eq!(admitted, 6);
        let Admission::Defer { until, reason } = p.admit("g", ProviderKind::Google, 1, now())
        else {
            panic!()
        };
        assert_eq!(reason, DeferReason::MailboxRate);
        assert_eq!(until, now() + chrono::Duration::seconds(1));
        go(p.admit("g", ProviderKind::Google, 1, until));
    }

    #[test]
    fn a_pause_defers_until_it_ends() {
        let p = Pacer::new(config());
        let until = now() + chrono::Duration::seconds(30);
        p.apply_pause("m", until);
        let Admission::Defer { until: u, reason } = p.admit("m", ProviderKind::Microsoft, 1, now())
        else {
            panic!()
        };
        assert_eq!((u, reason), (until, DeferReason::MailboxPaused));
        go(p.admit(
            "m",
            ProviderKind::Microsoft,
            1,
            until + chrono::Duration::seconds(1),
        ));
        go(p.admit("other", ProviderKind::Microsoft, 1, now()));
    }

    #[test]
    fn daily_limits_defer_to_the_next_utc_day() {
        let p = Pacer::new(config());
        for _ in 0..2 {
            go(p.admit("g", ProviderKind::Google, 1, now())).mark_sent();
        }
        // An admitted job that was not sent gives its reservation back.
        drop(go(p.admit("m", ProviderKind::Microsoft, 10, now())));
        let Admission::Defer { until, reason } = p.admit("g", ProviderKind::Google, 1, now())
        else {
            panic!()
        };
        assert_eq!(reason, DeferReason::DailyLimit);
        assert_eq!(until, Utc.with_ymd_and_hms(2026, 11, 29, 0, 0, 0).unwrap());
        // Microsoft counts recipients: 10 a day, this message has 11.
        assert_eq!(
            reason_of(p.admit("m", ProviderKind::Microsoft, 11, now())),
            DeferReason::DailyLimit
        );
        go(p.admit("g", ProviderKind::Google, 1, until));
    }

    fn reason_of(a: Admission) -> DeferReason {
        reason(a)
    }
}
