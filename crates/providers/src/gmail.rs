//! Gmail API `users.messages.send`.
//!
//! `POST /gmail/v1/users/me/messages/send` with `{"raw": base64url(RFC 5322)}`;
//! the answer is a Message resource `{"id", "threadId", "labelIds": ["SENT"]}`
//! (developers.google.com/gmail/api/reference/rest/v1/users.messages/send).
//! Larger messages (up to 35 MB) go through the resumable upload protocol
//! (developers.google.com/gmail/api/guides/uploads): `POST
//! /upload/gmail/v1/users/me/messages/send?uploadType=resumable` with
//! `X-Upload-Content-Type: message/rfc822` and `X-Upload-Content-Length` opens a
//! session (its URI in `Location`); the message then goes in `PUT` chunks with
//! `Content-Range` (multiples of 256 KiB but the last), each answered `308` with
//! the bytes received so far in `Range`, the last one `200` with the Message. A
//! chunk whose answer is lost is followed by a status query (`Content-Range:
//! bytes */N`), which also tells whether a lost last answer was a send. Simple
//! `uploadType=media` uploads are for 5 MB or less, so they are not used.

use base64::Engine as _;
use chrono::Utc;
use mail_dispatch_domain::{ErrorCode, FailureClass, OutgoingMessage};
use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::json;
use url::Url;

use crate::error::{ThrottleScope, get_with_token, parse_gmail_retry_after, retry_after_header};
use crate::mime::{BccHeader, render};
use crate::{Accepted, SendError};

/// Gmail's largest message, through the upload endpoint.
pub const MAX_MESSAGE_BYTES: usize = 35 * 1024 * 1024;
/// Recipients per message through the API (support.google.com/a/answer/166852).
pub const MAX_RECIPIENTS: usize = 100;
/// Above this raw size the resumable upload is used instead of a JSON body (whose
/// base64url makes 4 MB about 5.3 MB on the wire).
pub const UPLOAD_THRESHOLD_BYTES: usize = 4 * 1024 * 1024;
/// Size of a resumable upload's chunks (a multiple of 256 KiB, as required).
pub const UPLOAD_CHUNK_BYTES: usize = 32 * 256 * 1024;
/// The slowest upload rate a request is given time for, on top of the client's
/// timeout: a 8 MiB chunk gets 32 s more, so a slow link is not cut off.
const MIN_UPLOAD_BYTES_PER_SEC: f64 = 256.0 * 1024.0;
/// Status queries after a chunk whose answer was lost, before giving up.
const UPLOAD_RESUMES: u32 = 3;

/// Sends through the Gmail API.
#[derive(Clone, Debug)]
pub struct GmailSender {
    http: reqwest::Client,
    send_url: Url,
    upload_url: Url,
    /// The client's timeout for a request without a large body.
    timeout: std::time::Duration,
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
                "{root}/upload/gmail/v1/users/me/messages/send?uploadType=resumable"
            ))
            .expect("valid URL"),
            timeout: std::time::Duration::from_secs(30),
        }
    }

    /// The timeout the HTTP client was built with: uploads get it plus the time
    /// their bytes take at a slow rate.
    pub fn with_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn timeout_for(&self, bytes: usize) -> std::time::Duration {
        self.timeout + std::time::Duration::from_secs_f64(bytes as f64 / MIN_UPLOAD_BYTES_PER_SEC)
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
        if raw.len() > UPLOAD_THRESHOLD_BYTES {
            return self.upload(token, raw).await;
        }
        let encoded = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&raw);
        let response = self
            .http
            .post(self.send_url.clone())
            .timeout(self.timeout_for(encoded.len()))
            .json(&json!({ "raw": encoded }))
            .bearer_auth(token.expose_secret())
            .send()
            .await
            .map_err(|e| SendError::transport(&e))?;
        answer(response).await
    }

    /// The resumable upload of a rendered message.
    async fn upload(&self, token: &SecretString, raw: Vec<u8>) -> Result<Accepted, SendError> {
        let total = raw.len();
        let raw = bytes::Bytes::from(raw);
        let opened = self
            .http
            .post(self.upload_url.clone())
            .bearer_auth(token.expose_secret())
            .header("X-Upload-Content-Type", "message/rfc822")
            .header("X-Upload-Content-Length", total)
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/json; charset=UTF-8",
            )
            .body("{}")
            .send()
            .await
            // Nothing is sent before the session's last chunk.
            .map_err(|e| SendError {
                maybe_sent: false,
                ..SendError::transport(&e)
            })?;
        if !opened.status().is_success() {
            let status = opened.status();
            let retry_after = retry_after_header(opened.headers());
            let text = opened.text().await.unwrap_or_default();
            return Err(classify(status, &text, retry_after));
        }
        let session = opened
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| self.upload_url.join(v).ok())
            .ok_or_else(|| {
                SendError::new(
                    FailureClass::unavailable(None),
                    "Gmail opened an upload session without a Location",
                )
            })?;
        let mut offset = 0usize;
        let mut resumes = 0;
        loop {
            let end = (offset + UPLOAD_CHUNK_BYTES).min(total);
            // The session URI is the credential of the upload: no bearer token.
            let sent = self
                .http
                .put(session.clone())
                .timeout(self.timeout_for(end - offset))
                .header(
                    reqwest::header::CONTENT_RANGE,
                    format!("bytes {offset}-{}/{total}", end - 1),
                )
                .body(raw.slice(offset..end))
                .send()
                .await;
            let response = match sent {
                Ok(r) => r,
                Err(e) if resumes < UPLOAD_RESUMES => {
                    resumes += 1;
                    tracing::debug!(error = %SendError::transport(&e).message, offset, "Gmail upload chunk without an answer; asking the session where it stands");
                    match self.upload_status(&session, total).await {
                        Ok(Progress::Done(accepted)) => return Ok(accepted),
                        Ok(Progress::Received(n)) => {
                            offset = n;
                            continue;
                        }
                        Err(_) => return Err(last_chunk_error(&e, end == total)),
                    }
                }
                Err(e) => return Err(last_chunk_error(&e, end == total)),
            };
            match progress(response).await? {
                Progress::Done(accepted) => return Ok(accepted),
                Progress::Received(n) if n > offset => offset = n,
                Progress::Received(n) => {
                    return Err(SendError::new(
                        FailureClass::unavailable(None),
                        format!(
                            "Gmail's upload session kept {n} of {total} bytes and took no more"
                        ),
                    ));
                }
            }
        }
    }

    /// Asks an upload session how much it has (`Content-Range: bytes */N`).
    async fn upload_status(&self, session: &Url, total: usize) -> Result<Progress, SendError> {
        let response = self
            .http
            .put(session.clone())
            .header(reqwest::header::CONTENT_RANGE, format!("bytes */{total}"))
            .body(bytes::Bytes::new())
            .send()
            .await
            .map_err(|e| SendError::transport(&e))?;
        progress(response).await
    }
}

/// Where a resumable upload stands after a chunk or a status query.
enum Progress {
    /// The message is complete and was sent.
    Done(Accepted),
    /// The session holds this many bytes (`308 Resume Incomplete`).
    Received(usize),
}

async fn progress(response: reqwest::Response) -> Result<Progress, SendError> {
    if response.status().as_u16() == 308 {
        // `Range: bytes=0-N`, or none when nothing arrived yet.
        let received = response
            .headers()
            .get(reqwest::header::RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("bytes=0-"))
            .and_then(|n| n.parse::<usize>().ok())
            .map_or(0, |last| last + 1);
        return Ok(Progress::Received(received));
    }
    if matches!(response.status().as_u16(), 404 | 410) {
        // The session expired (they live about a week) or is unknown: the next
        // attempt opens a new one. Nothing was sent.
        return Err(SendError::new(
            FailureClass::unavailable(None),
            format!("Gmail's upload session is gone ({})", response.status()),
        ));
    }
    answer(response).await.map(Progress::Done)
}

/// A chunk without an answer: only the last one can have sent the message.
fn last_chunk_error(e: &reqwest::Error, last: bool) -> SendError {
    SendError {
        maybe_sent: last && SendError::transport(e).maybe_sent,
        ..SendError::transport(e)
    }
}

/// The Message resource of a send, or the error it answered.
async fn answer(response: reqwest::Response) -> Result<Accepted, SendError> {
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
    let scope = throttle_scope(reason.as_deref(), &lower);
    SendError {
        scope,
        ..SendError::new(class, message).with_provider(status.as_u16(), reason)
    }
}

/// Whom a Gmail throttle holds back. `userRateLimitExceeded`, and every 429
/// whose message names a per-user limit ("User-rate limit exceeded": mail
/// sending, bandwidth, concurrent requests — all per user), hold back the
/// mailbox; `rateLimitExceeded` otherwise is the Google Cloud project's quota
/// (developers.google.com/workspace/gmail/api/reference/quota: per project and
/// per user limits; guides/handle-errors), shared by every Google organization
/// of this deployment since they all go through its one OAuth client.
fn throttle_scope(reason: Option<&str>, lower_message: &str) -> ThrottleScope {
    let per_user = lower_message.contains("user-rate")
        || lower_message.contains("user rate")
        || lower_message.contains("per user");
    match reason {
        Some("rateLimitExceeded" | "RESOURCE_EXHAUSTED" | "RATE_LIMIT_EXCEEDED") if !per_user => {
            ThrottleScope::Project
        }
        _ => ThrottleScope::Mailbox,
    }
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

    /// Gmail's per-project quota holds back every Google organization; its
    /// per-user limits only the mailbox (gmail/api/reference/quota).
    #[test]
    fn a_project_quota_is_told_apart_from_a_user_limit() {
        let project = "Quota exceeded for quota metric 'Queries' and limit 'Queries per minute' of service 'gmail.googleapis.com' for consumer 'project_number:123'.";
        let per_user = "Quota exceeded for quota metric 'Queries' and limit 'Queries per minute per user' of service 'gmail.googleapis.com' for consumer 'project_number:123'.";
        let table: &[(u16, &str, &str, ThrottleScope)] = &[
            (
                403,
                "rateLimitExceeded",
                "Rate Limit Exceeded",
                ThrottleScope::Project,
            ),
            (429, "rateLimitExceeded", project, ThrottleScope::Project),
            (429, "rateLimitExceeded", per_user, ThrottleScope::Mailbox),
            (
                403,
                "userRateLimitExceeded",
                "User Rate Limit Exceeded",
                ThrottleScope::Mailbox,
            ),
            (
                429,
                "rateLimitExceeded",
                "User-rate limit exceeded.  Retry after 2026-11-28T10:00:12.500Z",
                ThrottleScope::Mailbox,
            ),
            (503, "backendError", "Backend Error", ThrottleScope::Mailbox),
        ];
        for (status, reason, message, expected) in table {
            let e = classify(
                StatusCode::from_u16(*status).unwrap(),
                &body(*status, reason, message, "RESOURCE_EXHAUSTED"),
                None,
            );
            assert_eq!(e.scope, *expected, "{status} {reason} {message}");
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
