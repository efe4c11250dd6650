//! Gmail API `users.messages.send`.
//!
//! `POST /gmail/v1/users/me/messages/send` with `{"raw": base64url(RFC 5322)}`;
//! the answer is a Message resource `{"id", "threadId", "labelIds": ["SENT"]}`
//! (developers.google.com/gmail/api/reference/rest/v1/users.messages/send).
//! Larger messages (up to 35 MB) go through the media upload endpoint,
//! `POST /upload/gmail/v1/users/me/messages/send?uploadType=media`, whose body is
//! the message itself (`Content-Type: message/rfc822`).

use base64::Engine as _;
use chrono::Utc;
use mail_dispatch_domain::{ErrorCode, FailureClass, OutgoingMessage};
use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::json;
use url::Url;

use crate::error::{get_with_token, parse_gmail_retry_after, retry_after_header};
use crate::mime::{BccHeader, render};
use crate::{Accepted, SendError};

/// Gmail's largest message, through the upload endpoint.
pub const MAX_MESSAGE_BYTES: usize = 35 * 1024 * 1024;
/// Recipients per message through the API (support.google.com/a/answer/166852).
pub const MAX_RECIPIENTS: usize = 100;
/// Above this raw size the media upload endpoint is used instead of a JSON body.
pub const UPLOAD_THRESHOLD_BYTES: usize = 4 * 1024 * 1024;

/// Sends through the Gmail API.
#[derive(Clone, Debug)]
pub struct GmailSender {
    http: reqwest::Client,
    send_url: Url,
    upload_url: Url,
}

impl GmailSender {
    /// `base` is the Gmail API root, e.g. `https://gmail.googleapis.com`.
    pub fn new(http: reqwest::Client, base: &Url) -> Self {
        let root = base.as_str().trim_end_matches('/');
        GmailSender {
            http,
            send_url: Url::parse(&format!("{root}/gmail/v1/users/me/messages/send"))
                .expect("valid URL"),
            upload_url: Url::parse(&format!(
                "{root}/upload/gmail/v1/users/me/messages/send?uploadType=media"
            ))
            .expect("valid URL"),
        }
    }

    pub async fn send(
        &self,
        token: &SecretString,
        msg: &OutgoingMessage,
    ) -> Result<Accepted, SendError> {
        // The attachments alone, base64-encoded, are a floor of the message's size:
        // above the limit, refuse before rendering tens of MB for nothing.
        let floor: usize = msg
            .attachments
            .iter()
            .map(|a| a.content.len().div_ceil(3) * 4)
            .sum();
        if floor > MAX_MESSAGE_BYTES {
            return Err(SendError::permanent(
                ErrorCode::MessageTooLarge,
                format!(
                    "message is over {floor} bytes (attachments in base64); Gmail accepts at most {MAX_MESSAGE_BYTES}"
                ),
            ));
        }
        let raw = render(msg, BccHeader::Keep)?;
        if raw.len() > MAX_MESSAGE_BYTES {
            return Err(SendError::permanent(
                ErrorCode::MessageTooLarge,
                format!(
                    "message is {} bytes; Gmail accepts at most {MAX_MESSAGE_BYTES}",
                    raw.len()
                ),
            ));
        }
        let request = if raw.len() > UPLOAD_THRESHOLD_BYTES {
            self.http
                .post(self.upload_url.clone())
                .header(reqwest::header::CONTENT_TYPE, "message/rfc822")
                .body(raw)
        } else {
            let encoded = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&raw);
            self.http
                .post(self.send_url.clone())
                .json(&json!({ "raw": encoded }))
        };
        let response = request
            .bearer_auth(token.expose_secret())
            .send()
            .await
            .map_err(|e| SendError::transport(&e))?;
        let status = response.status();
        let retry_after = retry_after_header(response.headers());
        let text = response.text().await.unwrap_or_default();
        if status.is_success() {
            let id = serde_json::from_str::<SentMessage>(&text)
                .ok()
                .map(|m| m.id);
            return Ok(Accepted {
                provider_message_id: id,
            });
        }
        Err(classify(status, &text, retry_after))
    }
}

impl GmailSender {
    /// The account's verified send-as addresses (`users.settings.sendAs.list`,
    /// which needs the `gmail.settings.basic` scope): its own address and the
    /// aliases whose verification is `accepted`.
    pub async fn send_as_addresses(&self, token: &SecretString) -> Result<Vec<String>, SendError> {
        let url = self
            .send_url
            .as_str()
            .replace("/messages/send", "/settings/sendAs");
        let url = Url::parse(&url).expect("derived from a valid URL");
        let text = get_with_token(&self.http, url, token, classify).await?;
        #[derive(Deserialize)]
        struct List {
            #[serde(default, rename = "sendAs")]
            send_as: Vec<SendAs>,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct SendAs {
            send_as_email: String,
            #[serde(default)]
            is_primary: bool,
            verification_status: Option<String>,
        }
        let list: List = serde_json::from_str(&text).map_err(|_| {
            SendError::new(
                FailureClass::unavailable(None),
                "Gmail sendAs list unreadable",
            )
        })?;
        Ok(list
            .send_as
            .into_iter()
            .filter(|a| a.is_primary || a.verification_status.as_deref() == Some("accepted"))
            .map(|a| a.send_as_email)
            .collect())
    }
}

#[derive(Deserialize)]
struct SentMessage {
    id: String,
}

/// Google's error body: `{"error": {"code", "message", "errors": [{"domain", "reason", "message"}], "status"}}`.
#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    message: Option<String>,
    #[serde(default)]
    errors: Vec<ErrorItem>,
    status: Option<String>,
}

#[derive(Deserialize)]
struct ErrorItem {
    reason: Option<String>,
}

/// Maps a Gmail error answer to a failure class and contract code
/// (developers.google.com/gmail/api/guides/handle-errors).
pub fn classify(
    status: StatusCode,
    body: &str,
    retry_after: Option<std::time::Duration>,
) -> SendError {
    let detail = serde_json::from_str::<ErrorBody>(body)
        .ok()
        .map(|b| b.error);
    let reason = detail
        .as_ref()
        .and_then(|d| d.errors.iter().find_map(|e| e.reason.clone()))
        .or_else(|| detail.as_ref().and_then(|d| d.status.clone()));
    let message = detail
        .as_ref()
        .and_then(|d| d.message.clone())
        .unwrap_or_else(|| format!("Gmail answered {status}"));
    let retry_after = retry_after.or_else(|| parse_gmail_retry_after(&message, Utc::now()));
    let lower = message.to_ascii_lowercase();
    let class = match (status.as_u16(), reason.as_deref()) {
        (401, _) => FailureClass::Unauthorized,
        (429, _) | (403, Some("userRateLimitExceeded" | "rateLimitExceeded")) => {
            FailureClass::throttled(retry_after)
        }
        (403, Some("dailyLimitExceeded" | "quotaExceeded")) => {
            FailureClass::Permanent(ErrorCode::QuotaExceeded)
        }
        (403, Some("domainPolicy")) => FailureClass::Permanent(ErrorCode::SenderNotAllowed),
        // The grant lacks the gmail.send scope: only a new consent can fix it.
        (403, Some("insufficientPermissions" | "ACCESS_TOKEN_SCOPE_INSUFFICIENT")) => {
            FailureClass::Permanent(ErrorCode::AuthRevoked)
        }
        (400, Some("failedPrecondition")) => FailureClass::Permanent(ErrorCode::SenderNotAllowed),
        (413, _) => FailureClass::Permanent(ErrorCode::MessageTooLarge),
        (400, _) if lower.contains("too large") => {
            FailureClass::Permanent(ErrorCode::MessageTooLarge)
        }
        (400, _)
            if lower.contains("recipient")
                || lower.contains(" to header")
                || lower.contains("address") =>
        {
            FailureClass::Permanent(ErrorCode::RecipientRejected)
        }
        (500 | 502 | 503 | 504 | 408, _) => FailureClass::unavailable(retry_after),
        (403 | 404, _) => FailureClass::Permanent(ErrorCode::SenderNotAllowed),
        (400, _) => FailureClass::Permanent(ErrorCode::InvalidJob),
        _ => FailureClass::Permanent(ErrorCode::ProviderUnavailable),
    };
    SendError::new(class, message).with_provider(status.as_u16(), reason)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn body(code: u16, reason: &str, message: &str, status: &str) -> String {
        json!({"error": {"code": code, "message": message,
            "errors": [{"domain": "usageLimits", "reason": reason, "message": message}], "status": status}})
        .to_string()
    }

    #[test]
    fn error_table() {
        let table: &[(u16, &str, &str, FailureClass)] = &[
            (
                401,
                "authError",
                "Invalid Credentials",
                FailureClass::Unauthorized,
            ),
            (
                403,
                "dailyLimitExceeded",
                "Daily Limit Exceeded",
                FailureClass::Permanent(ErrorCode::QuotaExceeded),
            ),
            (
                403,
                "userRateLimitExceeded",
                "User Rate Limit Exceeded",
                FailureClass::throttled(None),
            ),
            (
                403,
                "rateLimitExceeded",
                "Rate Limit Exceeded",
                FailureClass::throttled(None),
            ),
            (
                403,
                "domainPolicy",
                "The domain administrators have disabled Gmail apps.",
                FailureClass::Permanent(ErrorCode::SenderNotAllowed),
            ),
            (
                403,
                "insufficientPermissions",
                "Request had insufficient authentication scopes.",
                FailureClass::Permanent(ErrorCode::AuthRevoked),
            ),
            (
                400,
                "failedPrecondition",
                "Mail service not enabled",
                FailureClass::Permanent(ErrorCode::SenderNotAllowed),
            ),
            (
                400,
                "invalidArgument",
                "Invalid To header",
                FailureClass::Permanent(ErrorCode::RecipientRejected),
            ),
            (
                400,
                "invalidArgument",
                "Recipient address required",
                FailureClass::Permanent(ErrorCode::RecipientRejected),
            ),
            (
                400,
                "badRequest",
                "Bad Request",
                FailureClass::Permanent(ErrorCode::InvalidJob),
            ),
            (
                413,
                "uploadTooLarge",
                "Request too large",
                FailureClass::Permanent(ErrorCode::MessageTooLarge),
            ),
            (
                500,
                "backendError",
                "Backend Error",
                FailureClass::unavailable(None),
            ),
            (
                503,
                "backendError",
                "The service is currently unavailable.",
                FailureClass::unavailable(None),
            ),
        ];
        for (status, reason, message, expected) in table {
            let e = classify(
                StatusCode::from_u16(*status).unwrap(),
                &body(*status, reason, message, "X"),
                None,
            );
            assert_eq!(e.class, *expected, "{status} {reason}");
            assert_eq!(e.provider_code.as_deref(), Some(*reason));
        }
    }

    #[test]
    fn a_429_carries_the_retry_time_of_its_message() {
        let at = (Utc::now() + chrono::Duration::seconds(30))
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let message = format!("User-rate limit exceeded.  Retry after {at}");
        let e = classify(
            StatusCode::TOO_MANY_REQUESTS,
            &body(429, "rateLimitExceeded", &message, "RESOURCE_EXHAUSTED"),
            None,
        );
        let FailureClass::Transient {
            code,
            retry_after: Some(after),
        } = e.class
        else {
            panic!("{e:?}")
        };
        assert_eq!(code, ErrorCode::Throttled);
        assert!(
            after > Duration::from_secs(25) && after <= Duration::from_secs(30),
            "{after:?}"
        );
    }
}
