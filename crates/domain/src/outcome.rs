//! Outcomes: the result message of contract §4, its error codes, and the
//! `integration.needs_reauth` event.

use std::fmt;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

use crate::address::Mailbox;
use crate::job::{InvalidJob, Job};

/// Which sender handled a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    /// Microsoft 365 through Microsoft Graph `sendMail`.
    Microsoft,
    /// Google Workspace / Gmail through the Gmail API.
    Google,
    /// The platform's own sender (`no-reply@…`).
    Default,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Microsoft => "microsoft",
            ProviderKind::Google => "google",
            ProviderKind::Default => "default",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "microsoft" => Some(ProviderKind::Microsoft),
            "google" => Some(ProviderKind::Google),
            "default" => Some(ProviderKind::Default),
            _ => None,
        }
    }
}

impl fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The stable error codes of contract §4.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    InvalidJob,
    Expired,
    AuthRevoked,
    SenderNotAllowed,
    RecipientRejected,
    MessageTooLarge,
    QuotaExceeded,
    Throttled,
    ProviderUnavailable,
    NotConfigured,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJob => "invalid_job",
            ErrorCode::Expired => "expired",
            ErrorCode::AuthRevoked => "auth_revoked",
            ErrorCode::SenderNotAllowed => "sender_not_allowed",
            ErrorCode::RecipientRejected => "recipient_rejected",
            ErrorCode::MessageTooLarge => "message_too_large",
            ErrorCode::QuotaExceeded => "quota_exceeded",
            ErrorCode::Throttled => "throttled",
            ErrorCode::ProviderUnavailable => "provider_unavailable",
            ErrorCode::NotConfigured => "not_configured",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `sent` or `failed`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResultStatus {
    Sent,
    Failed,
}

/// The `error` object of a failed result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobError {
    pub code: ErrorCode,
    pub message: String,
    pub provider_status: Option<u16>,
    pub provider_code: Option<String>,
}

impl JobError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        JobError {
            code,
            message: message.into(),
            provider_status: None,
            provider_code: None,
        }
    }
}

/// The result message of contract §4 (version 1).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobResult {
    pub job_id: Option<String>,
    pub organization_id: Option<String>,
    pub workspace_id: Option<String>,
    pub category: Option<String>,
    pub status: ResultStatus,
    pub provider: Option<ProviderKind>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fallback: bool,
    pub sender: Option<Mailbox>,
    pub attempts: u32,
    pub provider_message_id: Option<String>,
    pub error: Option<JobError>,
    #[serde(with = "rfc3339_millis")]
    pub completed_at: DateTime<Utc>,
}

impl JobResult {
    /// The result of a job that could not be decoded or broke a rule.
    /// `message_id` is the AMQP `message_id` property, used when the body had no id.
    pub fn invalid(err: &InvalidJob, message_id: Option<&str>, now: DateTime<Utc>) -> Self {
        JobResult {
            job_id: err.job_id.clone().or_else(|| message_id.map(str::to_owned)),
            organization_id: err.organization_id.clone(),
            workspace_id: None,
            category: None,
            status: ResultStatus::Failed,
            provider: None,
            fallback: false,
            sender: None,
            attempts: 0,
            provider_message_id: None,
            error: Some(JobError::new(ErrorCode::InvalidJob, err.to_string())),
            completed_at: now,
        }
    }

    /// A result for a valid job; the caller fills provider, sender and outcome.
    pub fn for_job(job: &Job, now: DateTime<Utc>) -> Self {
        JobResult {
            job_id: Some(job.id.clone()),
            organization_id: Some(job.organization_id.clone()),
            workspace_id: job.workspace_id.clone(),
            category: Some(job.category.clone()),
            status: ResultStatus::Failed,
            provider: None,
            fallback: false,
            sender: None,
            attempts: 0,
            provider_message_id: None,
            error: None,
            completed_at: now,
        }
    }

    /// The AMQP routing key of this result on the results exchange.
    pub fn routing_key(&self) -> &'static str {
        match self.status {
            ResultStatus::Sent => "result.sent",
            ResultStatus::Failed => "result.failed",
        }
    }
}

/// An event about an organization's integration, published on the results
/// exchange with its `event` as routing key: `integration.needs_reauth` when a
/// provider refuses the stored grant, `integration.sending_blocked` when the
/// provider blocks the mailbox from sending. Either way the organization's admin
/// must act.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntegrationEvent {
    pub event: String,
    pub organization_id: String,
    pub provider: ProviderKind,
    /// What happened and what the organization's admin must do, with the
    /// provider's code (e.g. `AADSTS700082`); never a token.
    pub reason: String,
    #[serde(with = "rfc3339_millis")]
    pub occurred_at: DateTime<Utc>,
}

/// The `integration.needs_reauth` event (the name callers have always used).
pub type NeedsReauthEvent = IntegrationEvent;

impl IntegrationEvent {
    /// The routing key of `integration.needs_reauth`.
    pub const ROUTING_KEY: &'static str = "integration.needs_reauth";
    /// The routing key of `integration.sending_blocked`.
    pub const SENDING_BLOCKED: &'static str = "integration.sending_blocked";

    /// An `integration.needs_reauth` event.
    pub fn new(
        organization_id: &str,
        provider: ProviderKind,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Self {
        Self::named(Self::ROUTING_KEY, organization_id, provider, reason, now)
    }

    /// An `integration.sending_blocked` event.
    pub fn sending_blocked(
        organization_id: &str,
        provider: ProviderKind,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Self {
        Self::named(
            Self::SENDING_BLOCKED,
            organization_id,
            provider,
            reason,
            now,
        )
    }

    /// The routing key it is published with: its `event`.
    pub fn routing_key(&self) -> &str {
        &self.event
    }

    fn named(
        event: &str,
        organization_id: &str,
        provider: ProviderKind,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Self {
        IntegrationEvent {
            event: event.to_owned(),
            organization_id: organization_id.to_owned(),
            provider,
            reason: reason.to_owned(),
            occurred_at: now,
        }
    }
}

mod rfc3339_millis {
    use super::*;

    pub fn serialize<S: serde::Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Millis, true))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let raw = String::deserialize(d)?;
        DateTime::parse_from_rfc3339(&raw)
            .map(|t| t.with_timezone(&Utc))
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn a_result_serializes_as_in_the_contract() {
        let job = Job::decode(br#"{"id":"j1","organization_id":"org_42","workspace_id":"ws_7","category":"task_assigned","to":[{"email":"a@example.com"}],"subject":"s","text":"t"}"#).unwrap();
        let now = Utc.with_ymd_and_hms(2026, 11, 28, 10, 15, 3).unwrap();
        let mut r = JobResult::for_job(&job, now);
        r.status = ResultStatus::Sent;
        r.provider = Some(ProviderKind::Microsoft);
        r.attempts = 2;
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "job_id": "j1", "organization_id": "org_42", "workspace_id": "ws_7",
                "category": "task_assigned", "status": "sent", "provider": "microsoft",
                "sender": null, "attempts": 2, "provider_message_id": null, "error": null,
                "completed_at": "2026-11-28T10:15:03.000Z"
            })
        );
        assert_eq!(r.routing_key(), "result.sent");
        let back: JobResult = serde_json::from_value(v).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn an_invalid_job_falls_back_to_the_amqp_message_id() {
        let err = Job::decode(b"garbage").unwrap_err();
        let r = JobResult::invalid(&err, Some("amqp-id-1"), Utc::now());
        assert_eq!(r.job_id.as_deref(), Some("amqp-id-1"));
        assert_eq!(r.error.as_ref().unwrap().code, ErrorCode::InvalidJob);
        assert_eq!(r.routing_key(), "result.failed");
    }
}
