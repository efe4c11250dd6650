//! The providers' sending limits over a rolling window, as they enforce them.
//!
//! - **Google Workspace** (https://support.google.com/a/answer/166852): per user
//!   and rolling 24 hours, 2,000 messages (500 for trial accounts), 10,000
//!   recipients, 3,000 external recipients, 3,000 unique recipients of which
//!   2,000 external (500 for trial accounts): "individual addresses count once
//!   a day". Going over answers 429 "User-rate
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
    /// Distinct addresses sent to within the window.
    pub unique_recipients: Option<u32>,
    /// Distinct addresses of another domain sent to within the window.
    pub unique_external_recipients: Option<u32>,
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
            unique_recipients: Some(3_000),
            unique_external_recipients: Some(2_000),
        }
    }

    /// A Google Workspace trial user's: 500 messages, 500 unique external recipients.
    pub fn google_trial(window: Duration) -> Self {
        SendingQuota {
            messages: Some(500),
            unique_external_recipients: Some(500),
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
            unique_recipients: None,
            unique_external_recipients: None,
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
    /// Each accepted send, oldest first.
    sends: VecDeque<Sent>,
    /// Google: the user went over, and sends nothing until then.
    suspended_until: Option<Instant>,
    pub(super) refused: u64,
}

/// One accepted send: when, and its recipients (lower-cased) with whether
/// each is external.
struct Sent {
    at: Instant,
    recipients: Vec<(String, bool)>,
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

    /// Counts one message from `from` to `recipients` if the window allows
    /// it; `suspend` (Google) keeps the user from sending for a whole window
    /// once over.
    pub(super) fn take(
        &mut self,
        from: &str,
        recipients: &[String],
        suspend: bool,
    ) -> Result<(), OverQuota> {
        let now = Instant::now();
        let q = self.quota;
        while self
            .sends
            .front()
            .is_some_and(|s| now.duration_since(s.at) >= q.window)
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
        let adding = classify(from, recipients);
        let sent = || self.sends.iter().flat_map(|s| s.recipients.iter());
        let count = |all: &mut dyn Iterator<Item = &(String, bool)>| {
            all.fold((0u32, 0u32), |(n, ext), (_, e)| {
                (n + 1, ext + u32::from(*e))
            })
        };
        let (sent_all, sent_external) = count(&mut sent());
        let (add_all, add_external) = count(&mut adding.iter());
        let unique = |with_new: bool| {
            let mut seen: std::collections::HashSet<&(String, bool)> = sent().collect();
            if with_new {
                seen.extend(adding.iter());
            }
            count(&mut seen.into_iter())
        };
        let (unique_before, unique_external_before) = unique(false);
        let (unique_after, unique_external_after) = unique(true);
        let over = |limit: Option<u32>, before: u32, after: u32| {
            limit.is_some_and(|l| after > before && after > l)
        };
        if over(
            q.messages,
            self.sends.len() as u32,
            self.sends.len() as u32 + 1,
        ) || over(q.recipients, sent_all, sent_all + add_all)
            || over(
                q.external_recipients,
                sent_external,
                sent_external + add_external,
            )
            || over(q.unique_recipients, unique_before, unique_after)
            || over(
                q.unique_external_recipients,
                unique_external_before,
                unique_external_after,
            )
        {
            self.refused += 1;
            let wait = if suspend {
                self.suspended_until = Some(now + q.window);
                q.window
            } else {
                self.sends
                    .front()
                    .map_or(q.window, |s| q.window - now.duration_since(s.at))
            };
            return Err(OverQuota(wait));
        }
        self.sends.push_back(Sent {
            at: now,
            recipients: adding,
        });
        Ok(())
    }
}

/// The recipients of a message from `from`, lower-cased, each with whether it
/// is in another domain.
fn classify(from: &str, recipients: &[String]) -> Vec<(String, bool)> {
    let domain = |a: &str| a.rsplit_once('@').map(|(_, d)| d.to_ascii_lowercase());
    let own = domain(from);
    recipients
        .iter()
        .map(|r| (r.to_ascii_lowercase(), domain(r) != own))
        .collect()
}
