//! The providers' sending limits over a rolling window, as they enforce them.
//!
//! - **Google Workspace** (https://support.google.com/a/answer/166852): per user
//!   and rolling 24 hours, 2,000 messages (500 for trial accounts), 10,000
//!   recipients, 3,000 external recipients. Going over answers 429 "User-rate
//!   limit exceeded … (Mail sending)" with the time to retry at
//!   (https://developers.google.com/workspace/gmail/api/guides/handle-errors),
//!   and the user "can't send new messages for up to 24 hours": the stand-in
//!   refuses every send of that user for a whole window after the first refusal.
//! - **Exchange Online** (https://learn.microsoft.com/office365/servicedescriptions/exchange-online-service-description/exchange-online-limits#sending-limits-1):
//!   10,000 recipients per mailbox and rolling 24 hours. Graph still answers
//!   202: the limit is applied after acceptance, and the message comes back to
//!   the sender as an NDR (5.2.2). The stand-in accepts it, does not deliver it,
//!   and counts it as bounced.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// A mailbox's limits over a rolling window (`None`: not limited).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SendingQuota {
    pub window: Duration,
    pub messages: Option<u32>,
    pub recipients: Option<u32>,
    /// Recipients whose domain is not the sender's.
    pub external_recipients: Option<u32>,
}

const DAY: Duration = Duration::from_secs(24 * 3600);

impl SendingQuota {
    /// A paid Google Workspace user's limits, over `window` (24 h for real).
    pub fn google_workspace(window: Duration) -> Self {
        SendingQuota {
            window,
            messages: Some(2_000),
            recipients: Some(10_000),
            external_recipients: Some(3_000),
        }
    }

    /// A Google Workspace trial user's: 500 messages, 500 unique external recipients.
    pub fn google_trial(window: Duration) -> Self {
        SendingQuota {
            messages: Some(500),
            external_recipients: Some(500),
            ..Self::google_workspace(window)
        }
    }

    /// An Exchange Online mailbox's recipient rate limit.
    pub fn exchange_online(window: Duration) -> Self {
        SendingQuota {
            window,
            messages: None,
            recipients: Some(10_000),
            external_recipients: None,
        }
    }

    /// The same limits over the providers' own 24 hours.
    pub fn daily(self) -> Self {
        SendingQuota {
            window: DAY,
            ..self
        }
    }
}

/// What a mailbox sent within its window, and its refusals.
pub(super) struct QuotaState {
    quota: SendingQuota,
    /// (when, recipients, external recipients) of each accepted send, oldest first.
    sends: VecDeque<(Instant, u32, u32)>,
    /// Google: the user went over, and sends nothing until then.
    suspended_until: Option<Instant>,
    pub(super) refused: u64,
}

/// The answer to a send over the quota: how long until it could go.
pub(super) struct OverQuota(pub(super) Duration);

impl QuotaState {
    pub(super) fn new(quota: SendingQuota) -> Self {
        QuotaState {
            quota,
            sends: VecDeque::new(),
            suspended_until: None,
            refused: 0,
        }
    }

    /// Counts one message to `recipients` (of which `external`) if the window
    /// allows it; `suspend` (Google) keeps the user from sending for a whole
    /// window once over.
    pub(super) fn take(
        &mut self,
        recipients: u32,
        external: u32,
        suspend: bool,
    ) -> Result<(), OverQuota> {
        let now = Instant::now();
        let q = self.quota;
        while self
            .sends
            .front()
            .is_some_and(|(at, _, _)| now.duration_since(*at) >= q.window)
        {
            self.sends.pop_front();
        }
        if let Some(until) = self.suspended_until {
            if until > now {
                self.refused += 1;
                return Err(OverQuota(until - now));
            }
            self.suspended_until = None;
        }
        let messages = self.sends.len() as u32;
        let sent_recipients: u32 = self.sends.iter().map(|s| s.1).sum();
        let sent_external: u32 = self.sends.iter().map(|s| s.2).sum();
        let over = |limit: Option<u32>, sent: u32, adding: u32| {
            limit.is_some_and(|l| adding > 0 && sent + adding > l)
        };
        if over(q.messages, messages, 1)
            || over(q.recipients, sent_recipients, recipients)
            || over(q.external_recipients, sent_external, external)
        {
            self.refused += 1;
            let wait = if suspend {
                self.suspended_until = Some(now + q.window);
                q.window
            } else {
                self.sends
                    .front()
                    .map_or(q.window, |(at, _, _)| q.window - now.duration_since(*at))
            };
            return Err(OverQuota(wait));
        }
        self.sends.push_back((now, recipients, external));
        Ok(())
    }
}

/// Recipients of a message from `from`, and how many are in another domain.
pub(super) fn count_recipients<'a>(
    from: &str,
    recipients: impl Iterator<Item = &'a str>,
) -> (u32, u32) {
    let domain = |a: &str| a.rsplit_once('@').map(|(_, d)| d.to_ascii_lowercase());
    let own = domain(from);
    recipients.fold((0, 0), |(all, external), r| {
        (all + 1, external + u32::from(domain(r) != own))
    })
}
