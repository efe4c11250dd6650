//! The limits an admission must pass, on one organization's `OrgPacing`: its
//! in-flight cap, a 429 pause, the provider's daily quota, then the mailbox's own
//! cap (Graph's concurrent sends or Gmail's rate). They are plain checks on the
//! organization's state, with no lock or clock of their own, so that `admit` is
//! their composition and each can be read (and pruned) on its own.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use mail_dispatch_domain::ProviderKind;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{DeferReason, OrgPacing, PacingConfig};

/// How soon a deferred organization-busy or mailbox-busy job is tried again.
pub(super) const BUSY_RETRY: Duration = Duration::from_secs(1);
/// Gmail's burst allowance, as a share of a minute.
const GMAIL_BURST: Duration = Duration::from_secs(5);

/// A mailbox's count against the provider's daily limit, for one UTC day.
#[derive(Default)]
pub(super) struct DailyCount {
    pub(super) day: Option<NaiveDate>,
    /// Total of every replica at the last flush.
    pub(super) shared: u32,
    /// Sent here since the last flush.
    pub(super) unflushed: u32,
    /// Sent here and being written by a flush now: still counted, since `shared`
    /// does not hold them until the flush's answer.
    pub(super) flushing: u32,
}

impl DailyCount {
    /// Whether the count still matters on `today`: it is today's, or it has sends
    /// the other replicas have not heard of yet.
    pub(super) fn is_current(&self, today: NaiveDate) -> bool {
        self.unflushed > 0 || self.flushing > 0 || self.day == Some(today)
    }
}

/// A limit's answer when the job cannot go now: when to try again.
pub(super) struct Refusal {
    pub(super) until: DateTime<Utc>,
    pub(super) reason: DeferReason,
}

/// The room an admitted job took, given back when its permit drops.
pub(super) struct Room {
    pub(super) mailbox_slot: Option<OwnedSemaphorePermit>,
    /// Units of today's limit reserved.
    pub(super) daily_units: u32,
}

fn busy(now: DateTime<Utc>, reason: DeferReason) -> Refusal {
    Refusal {
        until: now + chrono::Duration::from_std(BUSY_RETRY).expect("small"),
        reason,
    }
}

fn next_utc_midnight(now: DateTime<Utc>) -> DateTime<Utc> {
    let tomorrow = now.date_naive().succ_opt().unwrap_or(now.date_naive());
    tomorrow
        .and_hms_opt(0, 0, 0)
        .expect("midnight exists")
        .and_utc()
}

impl OrgPacing {
    /// Checks every limit for one message of this organization through
    /// `provider` to `recipients` recipients and, when all pass, takes its room.
    /// A refused job takes nothing.
    pub(super) fn reserve(
        &mut self,
        c: &PacingConfig,
        provider: ProviderKind,
        recipients: usize,
        now: DateTime<Utc>,
    ) -> Result<Room, Refusal> {
        if self.in_flight >= c.org_max_in_flight.max(1) {
            return Err(busy(now, DeferReason::OrganizationBusy));
        }
        // The platform sender has no provider limits.
        let daily_units = match provider {
            ProviderKind::Microsoft => recipients as u32,
            ProviderKind::Google => 1,
            ProviderKind::Default => 0,
        };
        if provider != ProviderKind::Default {
            self.check_pause(now)?;
            let limit = match provider {
                ProviderKind::Microsoft => c.microsoft_daily_recipients,
                _ => c.google_daily_messages,
            };
            self.check_daily(limit, daily_units, now)?;
        }
        let mailbox_slot = match provider {
            ProviderKind::Microsoft => Some(self.take_graph_slot(c, now)?),
            ProviderKind::Google => {
                self.take_gmail_turn(c, now)?;
                None
            }
            ProviderKind::Default => None,
        };
        self.in_flight += 1;
        // Reserved now (so concurrent jobs cannot overshoot), given back if not sent.
        if daily_units > 0 {
            self.daily.get_or_insert_default().unflushed += daily_units;
        }
        Ok(Room {
            mailbox_slot,
            daily_units,
        })
    }

    /// Gives back what an admitted job took; its daily units too unless it was sent.
    pub(super) fn release(&mut self, daily_units: u32, sent: bool) {
        if !sent
            && daily_units > 0
            && let Some(d) = self.daily.as_mut()
        {
            // Saturating: a flush or the turn of the day may have emptied the count since.
            d.unflushed = d.unflushed.saturating_sub(daily_units);
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

    /// Defers to the next UTC day a job whose `units` would take today's count
    /// past `limit`. A count of an earlier day starts again from zero: the quota is
    /// per UTC day.
    fn check_daily(&mut self, limit: u32, units: u32, now: DateTime<Utc>) -> Result<(), Refusal> {
        let today = now.date_naive();
        let daily = self.daily.get_or_insert_default();
        if daily.day != Some(today) {
            *daily = DailyCount {
                day: Some(today),
                ..DailyCount::default()
            };
        }
        if daily.shared + daily.flushing + daily.unflushed + units > limit {
            return Err(Refusal {
                until: next_utc_midnight(now),
                reason: DeferReason::DailyLimit,
            });
        }
        Ok(())
    }

    /// One of the mailbox's concurrent Graph sends, if one is free.
    fn take_graph_slot(
        &mut self,
        c: &PacingConfig,
        now: DateTime<Utc>,
    ) -> Result<OwnedSemaphorePermit, Refusal> {
        let slots = self
            .graph_slots
            .get_or_insert_with(|| Arc::new(Semaphore::new(c.graph_mailbox_concurrency.max(1))));
        Arc::clone(slots)
            .try_acquire_owned()
            .map_err(|_| busy(now, DeferReason::MailboxBusy))
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
    /// arrival times already past, Graph slots no send holds, daily counts of other
    /// days and, given a `daily_floor`, those below it with nothing unflushed.
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
        let today = now.date_naive();
        if self.daily.as_ref().is_some_and(|d| {
            !d.is_current(today)
                || daily_floor
                    .is_some_and(|floor| d.unflushed == 0 && d.flushing == 0 && d.shared < floor)
        }) {
            self.daily = None;
        }
    }
}
