//! The limits an admission must pass, on one organization's `OrgPacing`: its
//! in-flight cap, a 429 pause, the provider's rolling 24-hour limits, then the mailbox's own
//! cap (Graph's concurrent sends or Gmail's rate). They are plain checks on the
//! organization's state, with no lock or clock of their own, so that `admit` is
//! their composition and each can be read (and pruned) on its own. Graph's cap
//! is the exception: its permits are waited for after admission
//! (`Pacer::take_mailbox_slots`), since a mailbox that is merely busy frees a
//! slot within one send's time.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use mail_dispatch_domain::ProviderKind;
use mail_dispatch_store::window_bucket;
use tokio::sync::Semaphore;

use super::{DeferReason, Demand, OrgPacing, PacingConfig, SendingBudget};

/// How soon a deferred organization-busy or mailbox-busy job is tried again.
pub(super) const BUSY_RETRY: Duration = Duration::from_secs(1);
/// Gmail's burst allowance, as a share of a minute.
const GMAIL_BURST: Duration = Duration::from_secs(5);

/// What the providers count over their rolling window, per mailbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Every recipient of every message (Exchange Online's recipient rate
    /// limit; Google's total recipients per day).
    Recipients,
    /// Messages (Google's messages per day).
    Messages,
    /// Recipients outside the sender's domain (Google's external recipients).
    ExternalRecipients,
}

impl Counter {
    pub const ALL: [Counter; 3] = [
        Counter::Recipients,
        Counter::Messages,
        Counter::ExternalRecipients,
    ];

    /// Its code in PostgreSQL (`mailbox_sends.counter`).
    pub fn code(self) -> i16 {
        match self {
            Counter::Recipients => 0,
            Counter::Messages => 1,
            Counter::ExternalRecipients => 2,
        }
    }

    pub fn from_code(code: i16) -> Option<Counter> {
        Counter::ALL.into_iter().find(|c| c.code() == code)
    }

    fn index(self) -> usize {
        self.code() as usize
    }
}

/// One counter of a mailbox over the rolling window.
#[derive(Default)]
pub(super) struct WindowCount {
    /// Total of every replica over the window at the last flush, less the
    /// oldest bucket once it left the window.
    pub(super) shared: u32,
    /// Sent here since the last flush.
    pub(super) unflushed: u32,
    /// Sent here and being written by a flush now: still counted, since `shared`
    /// does not hold them until the flush's answer.
    pub(super) flushing: u32,
    /// When the oldest counted bucket leaves the window, and what it holds.
    pub(super) oldest: Option<(DateTime<Utc>, u32)>,
    /// `shared` lost its oldest bucket: the next flush reads the total back
    /// even with nothing to write, to learn the next oldest.
    pub(super) stale: bool,
}

impl WindowCount {
    pub(super) fn total(&self) -> u32 {
        self.shared + self.flushing + self.unflushed
    }

    /// The oldest bucket leaves the window at its time: it no longer counts.
    fn expire(&mut self, now: DateTime<Utc>) {
        if let Some((leaves, units)) = self.oldest
            && leaves <= now
        {
            self.shared = self.shared.saturating_sub(units);
            self.oldest = None;
            self.stale = self.shared > 0;
        }
    }

    fn is_empty(&self) -> bool {
        self.total() == 0
    }
}

/// A mailbox's counts over the rolling window, one per [`Counter`].
#[derive(Default)]
pub(super) struct WindowCounts(pub(super) [WindowCount; 3]);

impl WindowCounts {
    pub(super) fn get_mut(&mut self, c: Counter) -> &mut WindowCount {
        &mut self.0[c.index()]
    }

    /// Whether anything is still counted (here or, at the last flush, anywhere).
    pub(super) fn is_empty(&self) -> bool {
        self.0.iter().all(WindowCount::is_empty)
    }

    fn nothing_pending(&self) -> bool {
        self.0.iter().all(|w| w.unflushed == 0 && w.flushing == 0)
    }
}

/// The provider's limits for one mailbox over the rolling window, per counter
/// (`None`: not limited), after the organization's share.
pub(super) fn window_limits(
    c: &PacingConfig,
    provider: ProviderKind,
    budget: SendingBudget,
) -> [Option<u32>; 3] {
    // Every recipient is counted, so staying under the unique limit keeps
    // Google's unique count (never more than ours) under it too.
    let google_recipients = c
        .google_daily_recipients
        .min(c.google_daily_unique_recipients);
    let mut limits = match provider {
        ProviderKind::Microsoft => [Some(c.microsoft_daily_recipients), None, None],
        ProviderKind::Google if budget.consumer => [
            Some(c.google_consumer_daily_recipients),
            Some(c.google_consumer_daily_messages),
            Some(c.google_consumer_daily_recipients),
        ],
        ProviderKind::Google if budget.trial => [
            Some(google_recipients),
            Some(c.google_trial_daily_messages),
            Some(c.google_trial_daily_external_recipients),
        ],
        ProviderKind::Google => [
            Some(google_recipients),
            Some(c.google_daily_messages),
            Some(c.google_daily_external_recipients),
        ],
        ProviderKind::Default => [None; 3],
    };
    let percent = u64::from(budget.limit_percent.clamp(1, 100));
    for limit in limits.iter_mut().flatten() {
        *limit = (u64::from(*limit) * percent / 100) as u32;
    }
    limits
}

/// What one message counts, per counter.
pub(super) fn window_units(provider: ProviderKind, demand: Demand) -> [u32; 3] {
    match provider {
        ProviderKind::Microsoft => [demand.recipients, 0, 0],
        ProviderKind::Google => [demand.recipients, 1, demand.external_recipients],
        ProviderKind::Default => [0; 3],
    }
}

/// A limit's answer when the job cannot go now: when to try again.
pub(super) struct Refusal {
    pub(super) until: DateTime<Utc>,
    pub(super) reason: DeferReason,
}

/// The room an admitted job took, given back when its permit drops.
pub(super) struct Room {
    /// For Graph: the mailbox's semaphore in this worker, one of whose permits
    /// the job must take before its send (see `Pacer::take_mailbox_slots`).
    pub(super) graph_mailbox: Option<Arc<Semaphore>>,
    /// Units of the rolling-window limits reserved, per counter.
    pub(super) window_units: [u32; 3],
}

fn busy(now: DateTime<Utc>, reason: DeferReason) -> Refusal {
    Refusal {
        until: now + chrono::Duration::from_std(BUSY_RETRY).expect("small"),
        reason,
    }
}

impl OrgPacing {
    /// Checks every limit for one message of this organization through
    /// `provider` (what it counts: `demand`; the mailbox's kind and share:
    /// `budget`) and, when all pass, takes its room. A refused job takes nothing.
    pub(super) fn reserve(
        &mut self,
        c: &PacingConfig,
        provider: ProviderKind,
        demand: Demand,
        budget: SendingBudget,
        now: DateTime<Utc>,
    ) -> Result<Room, Refusal> {
        if self.in_flight >= c.org_max_in_flight.max(1) {
            return Err(busy(now, DeferReason::OrganizationBusy));
        }
        // The platform sender has no provider limits.
        let window_units = window_units(provider, demand);
        if provider != ProviderKind::Default {
            self.check_pause(now)?;
            let limits = window_limits(c, provider, budget);
            self.check_window(c, &limits, &window_units, now)?;
        }
        let graph_mailbox = match provider {
            ProviderKind::Microsoft => Some(self.graph_mailbox(c)),
            ProviderKind::Google => {
                self.take_gmail_turn(c, now)?;
                None
            }
            ProviderKind::Default => None,
        };
        self.in_flight += 1;
        // Reserved now (so concurrent jobs cannot overshoot), given back if not sent.
        if window_units.iter().any(|u| *u > 0) {
            let counts = self.window.get_or_insert_default();
            for (w, units) in counts.0.iter_mut().zip(window_units) {
                w.unflushed += units;
            }
        }
        Ok(Room {
            graph_mailbox,
            window_units,
        })
    }

    /// Gives back what an admitted job took; its window units too unless it was sent.
    pub(super) fn release(&mut self, window_units: [u32; 3], sent: bool) {
        if !sent && let Some(counts) = self.window.as_mut() {
            for (w, units) in counts.0.iter_mut().zip(window_units) {
                // Saturating: a flush may have taken them since (they then stay
                // counted: a send that did not happen counted once costs only room).
                w.unflushed = w.unflushed.saturating_sub(units);
            }
        }
        self.in_flight = self.in_flight.saturating_sub(1);
    }

    /// A pause still running defers the job to its end; an ended one is forgotten.
    fn check_pause(&mut self, now: DateTime<Utc>) -> Result<(), Refusal> {
        match self.pause {
            Some(until) if until > now => Err(Refusal {
                until,
                reason: DeferReason::MailboxPaused,
            }),
            _ => {
                self.pause = None;
                Ok(())
            }
        }
    }

    /// Defers a job whose `units` would take a counter past its limit over the
    /// rolling window, until the oldest counted sends leave the window (or, when
    /// that is not known yet, one bucket later: the next flush learns it).
    fn check_window(
        &mut self,
        c: &PacingConfig,
        limits: &[Option<u32>; 3],
        units: &[u32; 3],
        now: DateTime<Utc>,
    ) -> Result<(), Refusal> {
        let counts = self.window.get_or_insert_default();
        let mut until: Option<DateTime<Utc>> = None;
        for ((w, limit), units) in counts.0.iter_mut().zip(limits).zip(units) {
            w.expire(now);
            let Some(limit) = limit else { continue };
            if *units > 0 && w.total() + units > *limit {
                let bucket = window_bucket(c.window);
                let retry = match w.oldest {
                    Some((leaves, _)) => leaves,
                    None => now + chrono::Duration::from_std(bucket).expect("small"),
                };
                until = Some(until.map_or(retry, |u| u.max(retry)));
            }
        }
        match until {
            Some(until) => Err(Refusal {
                until,
                reason: DeferReason::DailyLimit,
            }),
            None => Ok(()),
        }
    }

    /// The mailbox's Graph semaphore in this worker: `graph_mailbox_concurrency`
    /// sends at once. Its permits are waited for, not refused: the job already
    /// counts in the organization's in-flight cap, which bounds how many wait.
    fn graph_mailbox(&mut self, c: &PacingConfig) -> Arc<Semaphore> {
        Arc::clone(
            self.graph_slots.get_or_insert_with(|| {
                Arc::new(Semaphore::new(c.graph_mailbox_concurrency.max(1)))
            }),
        )
    }

    /// Gmail's rate as a GCRA: the theoretical arrival time moves one interval per
    /// send, and a send may run at most the burst ahead of it.
    fn take_gmail_turn(&mut self, c: &PacingConfig, now: DateTime<Utc>) -> Result<(), Refusal> {
        let interval =
            chrono::Duration::milliseconds(60_000 / i64::from(c.gmail_mailbox_per_minute.max(1)));
        let burst = chrono::Duration::from_std(GMAIL_BURST).expect("small");
        let tat = self.gmail_tat.unwrap_or(now).max(now);
        if tat - now > burst {
            return Err(Refusal {
                until: tat - burst,
                reason: DeferReason::MailboxRate,
            });
        }
        self.gmail_tat = Some(tat + interval);
        Ok(())
    }

    /// Drops the limits that no longer limit anything at `now`: ended pauses, Gmail
    /// arrival times already past, Graph slots no send holds, window counts with
    /// nothing counted and, given a `daily_floor`, those below it with nothing
    /// unflushed (the next flush of a mailbox that sends again reads its total
    /// back).
    pub(super) fn prune_limits(&mut self, now: DateTime<Utc>, daily_floor: Option<u32>) {
        if self.pause.is_some_and(|until| until <= now) {
            self.pause = None;
        }
        if self.gmail_tat.is_some_and(|tat| tat <= now) {
            self.gmail_tat = None;
        }
        if self
            .graph_slots
            .as_ref()
            .is_some_and(|slots| Arc::strong_count(slots) == 1)
        {
            self.graph_slots = None;
        }
        if let Some(counts) = self.window.as_mut() {
            for w in counts.0.iter_mut() {
                w.expire(now);
            }
        }
        if self.window.as_ref().is_some_and(|counts| {
            counts.is_empty()
                || daily_floor.is_some_and(|floor| {
                    counts.nothing_pending() && counts.0.iter().all(|w| w.shared < floor)
                })
        }) {
            self.window = None;
        }
    }
}
