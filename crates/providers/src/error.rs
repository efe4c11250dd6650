//! The error every sender returns, already classified.

use std::time::Duration;

use chrono::{DateTime, Utc};
use mail_dispatch_domain::{ErrorCode, FailureClass, JobError};

/// A failed send attempt, classified where it entered.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SendError {
    pub class: FailureClass,
    /// The provider's message (or ours), safe to show to the organization's admin.
    pub message: String,
    pub provider_status: Option<u16>,
    pub provider_code: Option<String>,
    /// The request reached the provider but no answer says what became of it
    /// (a timeout or a dropped connection after the request was sent, a
    /// gateway timeout): the message may have been accepted. Still transient:
    /// a retry may send it twice (README, "paths that can send twice").
    pub maybe_sent: bool,
    /// Whom a throttle holds back: the mailbox, or every mailbox of the
    /// provider's project (Gmail's per-project quota). Meaningless unless the
    /// class is a `throttled` one.
    pub scope: ThrottleScope,
    /// The provider blocks the account from sending at all (Exchange's
    /// `ErrorMessageSubmissionBlocked`): only the organization's admin can
    /// lift it, so the mailbox is paused and the host application told.
    pub sending_blocked: bool,
}

/// What a provider's throttle applies to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ThrottleScope {
    /// The sending mailbox alone (Graph's per-mailbox limits, Gmail's per-user ones).
    #[default]
    Mailbox,
    /// Every mailbox sending through this deployment's OAuth client: Gmail's
    /// per-project quota (`rateLimitExceeded`) is shared by every Google
    /// organization, since they all use one Google Cloud project.
    Project,
}

impl SendError {
    pub fn new(class: FailureClass, message: impl Into<String>) -> Self {
        SendError {
            class,
            message: message.into(),
            provider_status: None,
            provider_code: None,
            maybe_sent: false,
            scope: ThrottleScope::Mailbox,
            sending_blocked: false,
        }
    }

    pub fn permanent(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::new(FailureClass::Permanent(code), message)
    }

    pub(crate) fn with_provider(mut self, status: u16, code: Option<String>) -> Self {
        self.provider_status = Some(status);
        self.provider_code = code;
        self
    }

    /// An error of the HTTP client itself: the request may not have reached the
    /// provider, or its answer was lost. Always transient; `maybe_sent` unless
    /// the connection was never made (or the request never built), since a
    /// timeout or a reset after the request went out leaves the provider's
    /// answer unknown.
    pub(crate) fn transport(e: &reqwest::Error) -> Self {
        let what = if e.is_timeout() {
            "request timed out"
        } else if e.is_connect() {
            "could not connect"
        } else {
            "request failed"
        };
        SendError {
            maybe_sent: !(e.is_connect() || e.is_builder()),
            ..Self::new(
                FailureClass::unavailable(None),
                format!("{what}: {}", without_url(e)),
            )
        }
    }

    /// The error object of a failed result, with `code` the final code chosen by the caller.
    pub fn to_job_error(&self, code: ErrorCode) -> JobError {
        JobError {
            code,
            message: self.message.clone(),
            provider_status: self.provider_status,
            provider_code: self.provider_code.clone(),
        }
    }

    /// The contract code this error means if it is final.
    pub fn final_code(&self) -> ErrorCode {
        match self.class {
            FailureClass::Permanent(code) | FailureClass::Transient { code, .. } => code,
            FailureClass::Unauthorized => ErrorCode::AuthRevoked,
        }
    }
}

fn without_url(e: &reqwest::Error) -> String {
    // reqwest's Display includes the URL, which can carry a mailbox address.
    let s = e.to_string();
    match s.find(" for url (") {
        Some(i) => s[..i].to_owned(),
        None => s,
    }
}

/// The `Retry-After` of an answer, if it has a readable one.
pub(crate) fn retry_after_header(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, Utc::now()))
}

/// A GET with a bearer token: the body of a 2xx answer, or the error as the
/// provider's `classify` sees it.
pub(crate) async fn get_with_token(
    http: &reqwest::Client,
    url: url::Url,
    token: &secrecy::SecretString,
    classify: fn(reqwest::StatusCode, &str, Option<Duration>) -> SendError,
) -> Result<String, SendError> {
    use secrecy::ExposeSecret as _;
    let response = http
        .get(url)
        .bearer_auth(token.expose_secret())
        .send()
        .await
        .map_err(|e| SendError::transport(&e))?;
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    if status.is_success() {
        Ok(text)
    } else {
        Err(classify(status, &text, None))
    }
}

/// Parses an HTTP `Retry-After` value: delay-seconds or an HTTP-date (RFC 9110 §10.2.3).
pub fn parse_retry_after(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    let at: DateTime<Utc> = at.into();
    Some((at - now).to_std().unwrap_or_default())
}

/// Gmail puts the time to retry at in the 429 message: "User-rate limit exceeded.
/// Retry after 2026-11-28T10:15:03.120Z" (developers.google.com/gmail/api/guides/handle-errors).
pub fn parse_gmail_retry_after(message: &str, now: DateTime<Utc>) -> Option<Duration> {
    let rest = &message[message.find("Retry after ")? + "Retry after ".len()..];
    let stamp = rest.split_whitespace().next()?;
    let at = DateTime::parse_from_rfc3339(stamp.trim_end_matches(['.', ','])).ok()?;
    Some((at.with_timezone(&Utc) - now).to_std().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn retry_after_in_seconds_or_http_date() {
        let now = Utc.with_ymd_and_hms(2026, 11, 28, 10, 0, 0).unwrap();
        assert_eq!(parse_retry_after("30", now), Some(Duration::from_secs(30)));
        assert_eq!(
            parse_retry_after("Sat, 28 Nov 2026 10:00:45 GMT", now),
            Some(Duration::from_secs(45))
        );
        assert_eq!(
            parse_retry_after("Sat, 28 Nov 2026 09:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn gmail_retry_after_comes_from_the_message() {
        let now = Utc.with_ymd_and_hms(2026, 11, 28, 10, 0, 0).unwrap();
        assert_eq!(
            parse_gmail_retry_after(
                "User-rate limit exceeded.  Retry after 2026-11-28T10:00:12.500Z",
                now
            ),
            Some(Duration::from_millis(12_500))
        );
        assert_eq!(parse_gmail_retry_after("Rate Limit Exceeded", now), None);
    }
}
