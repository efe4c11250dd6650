//! What a provider is asked to send: a job's content with the sender chosen for it.

use std::collections::BTreeMap;

use crate::address::Mailbox;
use crate::job::{Attachment, Job};

/// A message ready for a provider. Built from a [`Job`] once its sender is known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutgoingMessage {
    pub from: Mailbox,
    pub to: Vec<Mailbox>,
    pub cc: Vec<Mailbox>,
    pub bcc: Vec<Mailbox>,
    pub reply_to: Option<Mailbox>,
    pub subject: String,
    pub text: Option<String>,
    pub html: Option<String>,
    pub attachments: Vec<Attachment>,
    pub headers: BTreeMap<String, String>,
    /// The RFC 5322 Message-ID, without angle brackets. Derived from the job id so
    /// that a retried job carries the same id (receiving systems such as Gmail drop
    /// a second copy with an identical Message-ID).
    pub message_id: Option<String>,
    /// Microsoft Graph only: keep a copy in the sender's Sent Items
    /// (`saveToSentItems`). Gmail always keeps one; the platform sender none.
    pub save_to_sent_items: bool,
}

impl OutgoingMessage {
    /// The job's content sent from `from`. `reply_to_override`, when given, replaces
    /// the job's Reply-To: the platform-sender fallback points replies at the
    /// organization's own sender address (contract §5).
    pub fn from_job(job: &Job, from: Mailbox, reply_to_override: Option<Mailbox>) -> Self {
        let from_domain = from.email.domain().to_owned();
        let from_domain = from_domain.as_str();
        OutgoingMessage {
            from,
            to: job.to.clone(),
            cc: job.cc.clone(),
            bcc: job.bcc.clone(),
            reply_to: reply_to_override.or_else(|| job.reply_to.clone()),
            subject: job.subject.clone(),
            text: job.text.clone(),
            html: job.html.clone(),
            attachments: job.attachments.clone(),
            headers: job.headers.clone(),
            message_id: Some(message_id_for(&job.id, &job.organization_id, from_domain)),
            save_to_sent_items: false,
        }
    }

    /// Every recipient, in to, cc, bcc order.
    pub fn recipients(&self) -> impl Iterator<Item = &Mailbox> {
        self.to.iter().chain(&self.cc).chain(&self.bcc)
    }
}

/// `job-<id>.<organization>@<sender domain>`, with every character outside RFC 5322
/// `atext` (and `.`) percent-encoded so any job id yields a valid Message-ID.
pub fn message_id_for(job_id: &str, organization_id: &str, domain: &str) -> String {
    fn encode(raw: &str, out: &mut String) {
        for b in raw.bytes() {
            if b.is_ascii_alphanumeric() || b"!#$&'*+-/=?^_`{|}~".contains(&b) {
                out.push(b as char);
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
    }
    let mut id = String::from("job-");
    encode(job_id, &mut id);
    id.push('.');
    encode(organization_id, &mut id);
    id.push('@');
    id.push_str(if domain.is_empty() {
        "mail-dispatch.invalid"
    } else {
        domain
    });
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_are_stable_and_valid_for_any_job_id() {
        assert_eq!(
            message_id_for("8d5e-0f0a", "org_42", "customer.com"),
            "job-8d5e-0f0a.org_42@customer.com"
        );
        assert_eq!(
            message_id_for("a<b>@c.d", "o", "x.com"),
            "job-a%3Cb%3E%40c%2Ed.o@x.com"
        );
    }
}
