//! The learnt schedule: what the pacer learns of an organization's sending (its
//! mean send time, and after 429s the rate the provider accepts), and the
//! wake-up slots it gives the organization's deferred jobs from that. Kept apart
//! from the limits: the limits decide whether a job goes now, the schedule only
//! when a deferred one comes back, so a mistake here costs pace, never a limit.

use std::time::Instant;

use chrono::{DateTime, Utc};
use mail_dispatch_domain::ProviderKind;

use super::{Pacer, PacingConfig};

/// Weight of the newest sample in the send-time averages.
const EWMA_WEIGHT: f64 = 0.1;
/// The learnt rate never goes below this (sends per second).
const MIN_RATE: f64 = 0.2;
/// Growth of the learnt rate per accepted send.
const RATE_GROWTH: f64 = 1.05;
/// The prior mean send time before anything was measured.
const DEFAULT_SEND_SECS: f64 = 0.25;
/// How long a learnt rate that no slot needs any more is worth keeping.
const STALE_THROTTLE: chrono::TimeDelta = chrono::TimeDelta::minutes(10);

/// Mean send time per provider over every organization, in seconds: what a new
/// flow starts from before it has measured its own.
pub(super) struct SendTimes([f64; 3]);

impl Default for SendTimes {
    fn default() -> Self {
        SendTimes([DEFAULT_SEND_SECS; 3])
    }
}

impl SendTimes {
    fn index(provider: ProviderKind) -> usize {
        match provider {
            ProviderKind::Microsoft => 0,
            ProviderKind::Google => 1,
            ProviderKind::Default => 2,
        }
    }

    pub(super) fn prior(&self, provider: ProviderKind) -> f64 {
        self.0[Self::index(provider)]
    }

    pub(super) fn learn(&mut self, provider: ProviderKind, secs: f64) {
        let mean = &mut self.0[Self::index(provider)];
        *mean += EWMA_WEIGHT * (secs - *mean);
    }
}

/// What the pacer learnt of one organization's sending.
#[derive(Debug)]
pub(super) struct Flow {
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
    /// A flow with no slot taken, starting from the mean send time `prior`.
    pub(super) fn new(prior: f64, now: DateTime<Utc>) -> Flow {
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

    /// One send of the organization is over after `secs`; `accepted` if the
    /// provider took the message.
    pub(super) fn learn_send(&mut self, secs: f64, accepted: bool) {
        self.send_secs += EWMA_WEIGHT * (secs - self.send_secs);
        if accepted {
            let window = self.window_start.elapsed().as_secs_f64();
            if window >= 1.0 {
                self.previous_window_rate = Some(f64::from(self.window_accepted) / window);
                self.window_start = Instant::now();
                self.window_accepted = 0;
            }
            self.window_accepted += 1;
            if let Some(rate) = self.accepted_rate.as_mut() {
                // Bounded: past any expected rate it no longer limits anything.
                *rate = (*rate * RATE_GROWTH).min(1e6);
            }
        }
    }

    /// Sends per second this organization is expected to manage through `provider`.
    fn expected_rate(&self, c: &PacingConfig, provider: ProviderKind) -> f64 {
        let parallel = match provider {
            ProviderKind::Microsoft => c.org_max_in_flight.min(c.graph_mailbox_concurrency),
            _ => c.org_max_in_flight,
        }
        .max(1) as f64;
        let mut rate = parallel / self.send_secs.max(1e-4);
        if provider == ProviderKind::Google {
            rate = rate.min(f64::from(c.gmail_mailbox_per_minute.max(1)) / 60.0);
        }
        if let Some(accepted) = self.accepted_rate {
            rate = rate.min(accepted);
        }
        rate.max(MIN_RATE)
    }

    /// Gives a deferred job its wake-up slot: not before `until`, and after the
    /// jobs deferred before it, one expected send time apart.
    pub(super) fn wake_slot(
        &mut self,
        c: &PacingConfig,
        provider: ProviderKind,
        until: DateTime<Utc>,
    ) -> DateTime<Utc> {
        let spacing =
            chrono::Duration::microseconds((1e6 / self.expected_rate(c, provider)) as i64);
        let wake = until.max(self.next_slot);
        self.next_slot = wake + spacing;
        wake
    }

    /// See [`Pacer::throttled`].
    fn throttle(&mut self, c: &PacingConfig, provider: ProviderKind, now: DateTime<Utc>) {
        if self
            .last_throttle
            .is_some_and(|t| now - t < chrono::Duration::seconds(1))
        {
            return;
        }
        let expected = self.expected_rate(c, provider);
        let learnt = match self.recent_accepted_rate() {
            Some(accepted) => accepted.min(expected),
            None => expected / 2.0,
        }
        .max(MIN_RATE);
        self.accepted_rate = Some(learnt);
        self.last_throttle = Some(now);
    }

    /// Whether the flow still tells something at `now`: a slot ahead that later
    /// deferrals must queue behind, or a learnt rate recent enough to trust. A
    /// flow forgotten starts again from the provider's mean send time.
    pub(super) fn still_matters(&self, now: DateTime<Utc>) -> bool {
        self.next_slot > now
            || self
                .last_throttle
                .is_some_and(|t| self.accepted_rate.is_some() && now - t < STALE_THROTTLE)
    }

    #[cfg(test)]
    pub(super) fn learnt_rate(&self) -> Option<f64> {
        self.accepted_rate
    }
}

impl Pacer {
    /// The provider throttled `org`'s mailbox (a 429): its learnt rate becomes the
    /// rate the provider accepted lately, or half the expected rate when nothing
    /// was accepted lately (at most once a second, since one burst brings several
    /// 429s at once). Not halving what was measured: 429s that follow are mostly
    /// from jobs scheduled at the old rate, and would drive the rate to the floor.
    pub fn throttled(&self, org: &str, provider: ProviderKind, now: DateTime<Utc>) {
        self.state()
            .flow_mut(org, provider, now)
            .throttle(&self.config, provider, now);
    }
}
