//! Microsoft Graph `sendMail`, JSON form.
//!
//! Request and answer shapes follow learn.microsoft.com/en-us/graph/api/user-sendmail:
//! `POST /v1.0/me/sendMail` with `{"message": {...}, "saveToSentItems": bool}`;
//! success is `202 Accepted` with an empty body (accepted for delivery, not
//! delivered: non-delivery reports arrive later in the sender's mailbox).
//! A 2xx is never retried, even with a `Retry-After`: that would send duplicates.
//! A 504 is ambiguous (the mail may have gone); it is retried like other 5xx,
//! which is the one case where a duplicate can reach a recipient from here.
//! The message carries the job's Message-ID as `internetMessageId` (writable
//! while a message is a draft: learn.microsoft.com/graph/api/message-update), so
//! every attempt reaches recipients with the same id and a duplicate can be told
//! apart. The MIME form of `sendMail` would carry it too, but always saves to
//! Sent Items, and Sent Items is the organization's choice here.
//!
//! Every call carries a new `client-request-id` (with `return-client-request-id:
//! true`) and logs it with Graph's `request-id` and `Date` answer headers: what
//! Microsoft support asks for to trace a request
//! (learn.microsoft.com/graph/best-practices-concept#reliability-and-support).
//!
//! A message over the single-request limit goes, when the operator allows it
//! (`MAIL_DISPATCH_GRAPH_LARGE_MESSAGES`, which needs `Mail.ReadWrite`), through
//! the documented large-attachment path
//! (learn.microsoft.com/graph/outlook-large-attachments): a draft
//! (`POST /v1.0/me/messages`, carrying the `internetMessageId` too), each
//! attachment added in one request when it fits, else through an upload session
//! (`attachments/createUploadSession`, then `PUT` fragments of at most 4 MB to its
//! pre-authenticated URL), and `POST /v1.0/me/messages/{id}/send`, which always
//! saves to Sent Items. A draft whose message was not sent is deleted.

use base64::Engine as _;
use mail_dispatch_domain::{Attachment, ErrorCode, FailureClass, Mailbox, OutgoingMessage};
use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{Value, json};
use url::Url;

use crate::error::retry_after_header;
use crate::{Accepted, SendError};

/// Graph refuses requests over 4 MB (graph/throttling-limits#outlook-service-limits).
/// Whether that is 4,000,000 or 4,194,304 bytes is not documented, and headers
/// count too: the body stays below the smaller, with a margin.
pub const MAX_REQUEST_BYTES: usize = 3_900_000;

/// Upload session fragments: a multiple of 320 KiB (as Microsoft recommends for
/// upload sessions) under the 4 MB cap of each `PUT`.
pub const UPLOAD_FRAGMENT_BYTES: usize = 10 * 320 * 1024;

/// Exchange Online's default maximum message size, 35 MB
/// (learn.microsoft.com/office365/servicedescriptions/exchange-online-service-description/exchange-online-limits#message-limits).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 35 * 1024 * 1024;

/// The setting that turns the large-message path on.
pub const LARGE_MESSAGES_SETTING: &str = "MAIL_DISPATCH_GRAPH_LARGE_MESSAGES";

/// The slowest upload rate a fragment is given time for, on top of the timeout.
const MIN_UPLOAD_BYTES_PER_SEC: f64 = 256.0 * 1024.0;

/// The large-message path, when the operator turned it on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LargeMessages {
    /// The tenant's maximum message size as Exchange counts it (attachments in
    /// base64): above, a job fails `message_too_large` before any call.
    pub max_message_bytes: usize,
}

/// Sends through Microsoft Graph.
#[derive(Clone, Debug)]
pub struct GraphSender {
    http: reqwest::Client,
    send_url: Url,
    me_url: Url,
    messages_url: Url,
    large: Option<LargeMessages>,
    /// The client's timeout for a request without a large body.
    timeout: std::time::Duration,
}

impl GraphSender {
    /// `base` is the Graph root, e.g. `https://graph.microsoft.com`.
    pub fn new(http: reqwest::Client, base: &Url) -> Self {
        GraphSender {
            http,
            send_url: join(base, "v1.0/me/sendMail"),
            me_url: join(base, "v1.0/me"),
            messages_url: join(base, "v1.0/me/messages"),
            large: None,
            timeout: std::time::Duration::from_secs(30),
        }
    }

    /// Turns the draft-and-upload-session path on (`Some`) or off.
    pub fn with_large_messages(mut self, large: Option<LargeMessages>) -> Self {
        self.large = large;
        self
    }

    /// The timeout the HTTP client was built with: upload fragments get it plus
    /// the time their bytes take at a slow rate.
    pub fn with_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn timeout_for(&self, bytes: usize) -> std::time::Duration {
        self.timeout + std::time::Duration::from_secs_f64(bytes as f64 / MIN_UPLOAD_BYTES_PER_SEC)
    }

    /// The JSON body of a `sendMail` request.
    pub fn request_body(&self, msg: &OutgoingMessage) -> Value {
        let mut message = message_json(msg);
        if !msg.attachments.is_empty() {
            let attachments = msg.attachments.iter().map(file_attachment).collect();
            message
                .as_object_mut()
                .expect("object literal")
                .insert("attachments".into(), attachments);
        }
        json!({"message": message, "saveToSentItems": msg.save_to_sent_items})
    }

    /// The size of the `sendMail` request for `msg`, without encoding its
    /// attachments (base64 needs no JSON escaping: its length is known).
    pub fn request_size(&self, msg: &OutgoingMessage) -> usize {
        let bare = serde_json::to_vec(&json!({"message": message_json(msg),
            "saveToSentItems": msg.save_to_sent_items}))
        .expect("JSON values serialize")
        .len();
        let attachments: usize = msg
            .attachments
            .iter()
            .map(|a| attachment_metadata_size(a) + base64_len(a.content.len()) + 1)
            .sum();
        // `,"attachments":[…]` with its commas.
        bare + if msg.attachments.is_empty() {
            0
        } else {
            r#","attachments":[]"#.len() + attachments - 1
        }
    }

    /// Sends `msg` with the mailbox's access token.
    pub async fn send(
        &self,
        token: &SecretString,
        msg: &OutgoingMessage,
    ) -> Result<Accepted, SendError> {
        let size = self.request_size(msg);
        if size <= MAX_REQUEST_BYTES {
            return self.send_mail(token, msg).await;
        }
        match self.large {
            Some(large) => self.send_large(token, msg, large).await,
            None => Err(SendError::permanent(
                ErrorCode::MessageTooLarge,
                format!(
                    "message is {size} bytes as a Graph request; Microsoft Graph accepts at most {MAX_REQUEST_BYTES} in one request, and larger messages need {LARGE_MESSAGES_SETTING}=true (a draft and upload sessions, with the Mail.ReadWrite permission)"
                ),
            )),
        }
    }
}

/// The message of a `sendMail` request or a draft, without attachments.
fn message_json(msg: &OutgoingMessage) -> Value {
    let (content_type, content) = match (&msg.html, &msg.text) {
        // The JSON form carries one body; HTML wins when the job has both.
        (Some(html), _) => ("HTML", html.as_str()),
        (None, Some(text)) => ("Text", text.as_str()),
        (None, None) => ("Text", ""),
    };
    let mut message = json!({
        "subject": msg.subject,
        "body": {"contentType": content_type, "content": content},
        "from": recipient(&msg.from),
        "toRecipients": msg.to.iter().map(recipient).collect::<Vec<_>>(),
    });
    let m = message.as_object_mut().expect("object literal");
    if !msg.cc.is_empty() {
        m.insert(
            "ccRecipients".into(),
            msg.cc.iter().map(recipient).collect(),
        );
    }
    if !msg.bcc.is_empty() {
        m.insert(
            "bccRecipients".into(),
            msg.bcc.iter().map(recipient).collect(),
        );
    }
    if let Some(r) = &msg.reply_to {
        m.insert("replyTo".into(), json!([recipient(r)]));
    }
    if let Some(id) = &msg.message_id {
        m.insert("internetMessageId".into(), json!(format!("<{id}>")));
    }
    // An empty internetMessageHeaders array is refused by Graph: omit it.
    if !msg.headers.is_empty() {
        let headers = msg
            .headers
            .iter()
            .map(|(name, value)| json!({"name": name, "value": value}))
            .collect();
        m.insert("internetMessageHeaders".into(), headers);
    }
    message
}

fn file_attachment(a: &Attachment) -> Value {
    json!({
        "@odata.type": "#microsoft.graph.fileAttachment",
        "name": a.filename,
        "contentType": a.content_type,
        "contentBytes": base64::engine::general_purpose::STANDARD.encode(&a.content),
    })
}

/// The JSON of `file_attachment(a)` without its base64 content.
fn attachment_metadata_size(a: &Attachment) -> usize {
    serde_json::to_vec(&json!({
        "@odata.type": "#microsoft.graph.fileAttachment",
        "name": a.filename,
        "contentType": a.content_type,
        "contentBytes": "",
    }))
    .expect("JSON values serialize")
    .len()
}

fn base64_len(n: usize) -> usize {
    n.div_ceil(3) * 4
}

impl GraphSender {
    /// `sendMail`: the whole message in one request.
    async fn send_mail(
        &self,
        token: &SecretString,
        msg: &OutgoingMessage,
    ) -> Result<Accepted, SendError> {
        let body = serde_json::to_vec(&self.request_body(msg)).expect("JSON values serialize");
        let request = self
            .http
            .post(self.send_url.clone())
            .bearer_auth(token.expose_secret())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        let response = traced_call("sendMail", request).await?;
        let status = response.status();
        if status.is_success() {
            let request_id = response
                .headers()
                .get("request-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            return Ok(Accepted {
                provider_message_id: request_id,
            });
        }
        let retry_after = retry_after_header(response.headers());
        let text = response.text().await.unwrap_or_default();
        Err(classify(status, &text, retry_after))
    }

    /// The large-message path: a draft, its attachments, then `send`. Nothing
    /// reaches a recipient before `send`: an error before it is never `maybe_sent`.
    async fn send_large(
        &self,
        token: &SecretString,
        msg: &OutgoingMessage,
        large: LargeMessages,
    ) -> Result<Accepted, SendError> {
        let draft = serde_json::to_vec(&message_json(msg)).expect("JSON values serialize");
        let size = draft.len()
            + msg
                .attachments
                .iter()
                .map(|a| base64_len(a.content.len()))
                .sum::<usize>();
        if size > large.max_message_bytes {
            return Err(SendError::permanent(
                ErrorCode::MessageTooLarge,
                format!(
                    "message is about {size} bytes with its attachments in base64; the mailbox's tenant accepts at most {} (MAIL_DISPATCH_GRAPH_MAX_MESSAGE_BYTES)",
                    large.max_message_bytes
                ),
            ));
        }
        if draft.len() > MAX_REQUEST_BYTES {
            return Err(SendError::permanent(
                ErrorCode::MessageTooLarge,
                format!(
                    "the message without its attachments is {} bytes as a Graph request; Microsoft Graph accepts at most {MAX_REQUEST_BYTES}",
                    draft.len()
                ),
            ));
        }
        let created = self
            .call(
                "createDraft",
                self.http
                    .post(self.messages_url.clone())
                    .bearer_auth(token.expose_secret())
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(draft),
            )
            .await
            .map_err(|e| not_sent(without_read_write(e)))?;
        let id = read_json::<Created>(created).await.map_err(not_sent)?.id;
        let sent = async {
            for a in &msg.attachments {
                self.attach(token, &id, a).await.map_err(not_sent)?;
            }
            self.send_draft(token, &id).await
        }
        .await;
        if let Err(e) = &sent {
            // A send whose answer was lost may have gone out with its draft;
            // anything else leaves a draft no one will send.
            if !e.maybe_sent {
                self.delete_draft(token, &id).await;
            }
        }
        sent
    }

    fn draft_url(&self, id: &str, leaf: &[&str]) -> Url {
        let mut url = self.messages_url.clone();
        url.path_segments_mut()
            .expect("an http URL has a path")
            .push(id)
            .extend(leaf);
        url
    }

    /// Adds one attachment: in one request when it fits, else through an upload
    /// session, streamed from the job's bytes in fragments (never in base64).
    async fn attach(
        &self,
        token: &SecretString,
        id: &str,
        a: &Attachment,
    ) -> Result<(), SendError> {
        if attachment_metadata_size(a) + base64_len(a.content.len()) <= MAX_REQUEST_BYTES {
            let body = serde_json::to_vec(&file_attachment(a)).expect("JSON values serialize");
            self.call(
                "addAttachment",
                self.http
                    .post(self.draft_url(id, &["attachments"]))
                    .bearer_auth(token.expose_secret())
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body),
            )
            .await?;
            return Ok(());
        }
        let total = a.content.len();
        let opened = self
            .call(
                "createUploadSession",
                self.http
                    .post(self.draft_url(id, &["attachments", "createUploadSession"]))
                    .bearer_auth(token.expose_secret())
                    .json(&json!({"AttachmentItem": {
                        "attachmentType": "file",
                        "name": a.filename,
                        "size": total,
                        "contentType": a.content_type,
                    }})),
            )
            .await?;
        let session = read_json::<UploadSession>(opened).await?;
        // Fragments share the job's buffer: no copy of the attachment is made.
        let content = bytes::Bytes::from_owner(a.content.clone());
        let mut offset = 0;
        while offset < total {
            let end = (offset + UPLOAD_FRAGMENT_BYTES).min(total);
            // The upload URL is pre-authenticated: no Authorization header.
            let response = self
                .call(
                    "uploadFragment",
                    self.http
                        .put(session.upload_url.as_str())
                        .header(
                            reqwest::header::CONTENT_RANGE,
                            format!("bytes {offset}-{}/{total}", end - 1),
                        )
                        .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                        .timeout(self.timeout_for(end - offset))
                        .body(content.slice(offset..end)),
                )
                .await?;
            if response.status() == StatusCode::CREATED {
                return Ok(());
            }
            let progress = read_json::<UploadProgress>(response).await?;
            let next = progress.next_start().ok_or_else(|| {
                SendError::new(
                    FailureClass::unavailable(None),
                    "Graph's upload session answered without the next expected range",
                )
            })?;
            if next <= offset || next > total {
                return Err(SendError::new(
                    FailureClass::unavailable(None),
                    format!(
                        "Graph's upload session expects byte {next} after a fragment that started at {offset}"
                    ),
                ));
            }
            offset = next;
        }
        Err(SendError::new(
            FailureClass::unavailable(None),
            "Graph's upload session took every byte but did not create the attachment",
        ))
    }

    async fn send_draft(&self, token: &SecretString, id: &str) -> Result<Accepted, SendError> {
        let response = self
            .call(
                "sendDraft",
                self.http
                    .post(self.draft_url(id, &["send"]))
                    .bearer_auth(token.expose_secret())
                    .header(reqwest::header::CONTENT_LENGTH, 0),
            )
            .await?;
        Ok(Accepted {
            provider_message_id: request_id(&response),
        })
    }

    /// Best effort: a draft left behind is visible to the mailbox's owner, not
    /// to recipients, so a failed delete is logged and the send's error kept.
    async fn delete_draft(&self, token: &SecretString, id: &str) {
        let result = self
            .call(
                "deleteDraft",
                self.http
                    .delete(self.draft_url(id, &[]))
                    .bearer_auth(token.expose_secret()),
            )
            .await;
        if let Err(e) = result {
            tracing::warn!(error = %e.message, "the draft of a large Graph message could not be deleted; it stays in the mailbox's Drafts");
        }
    }

    /// Sends a request; an answer other than 2xx is classified.
    async fn call(
        &self,
        operation: &'static str,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, SendError> {
        let response = traced_call(operation, request).await?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let retry_after = retry_after_header(response.headers());
        let text = response.text().await.unwrap_or_default();
        Err(classify(status, &text, retry_after))
    }

    /// The signed-in user, from `GET /v1.0/me?$select=…` (needs `User.Read`,
    /// learn.microsoft.com/graph/api/user-get). `mail` is null for a user with no
    /// Exchange Online mailbox: the user principal name is then no mail address.
    pub async fn me(&self, token: &SecretString) -> Result<GraphUser, SendError> {
        let mut url = self.me_url.clone();
        url.query_pairs_mut().append_pair(
            "$select",
            "id,displayName,mail,userPrincipalName,proxyAddresses",
        );
        let request = self.http.get(url).bearer_auth(token.expose_secret());
        let response = traced_call("me", request).await?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        if !status.is_success() {
            return Err(classify(status, &text, None));
        }
        serde_json::from_str(&text).map_err(|_| {
            SendError::new(
                FailureClass::unavailable(None),
                "Graph /me answered with unreadable JSON",
            )
        })
    }
}

/// A draft refused for want of `Mail.ReadWrite` (a grant made before the
/// option was turned on): say so, the admin must reconnect.
fn without_read_write(e: SendError) -> SendError {
    if e.provider_code.as_deref() != Some("ErrorAccessDenied") {
        return e;
    }
    SendError {
        message: format!(
            "Microsoft Graph refused to create the draft of a large message ({}): the grant lacks Mail.ReadWrite, which {LARGE_MESSAGES_SETTING} needs; the organization's admin must reconnect",
            e.message
        ),
        ..e
    }
}

/// An error before the draft's `send`: no recipient can have the message.
fn not_sent(e: SendError) -> SendError {
    SendError {
        maybe_sent: false,
        ..e
    }
}

fn request_id(response: &reqwest::Response) -> Option<String> {
    response
        .headers()
        .get("request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

async fn read_json<T: serde::de::DeserializeOwned>(
    response: reqwest::Response,
) -> Result<T, SendError> {
    let text = response
        .text()
        .await
        .map_err(|e| SendError::transport(&e))?;
    serde_json::from_str(&text).map_err(|_| {
        SendError::new(
            FailureClass::unavailable(None),
            "Microsoft Graph answered with unreadable JSON",
        )
    })
}

/// The draft `POST /v1.0/me/messages` created.
#[derive(Deserialize)]
struct Created {
    id: String,
}

/// `createUploadSession`'s answer (graph/api/resources/uploadsession).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct UploadSession {
    upload_url: String,
}

/// A fragment's answer: for Outlook attachments `nextExpectedRanges` holds one
/// value, the next byte to send (`"{start}"`, or `"{start}-"` elsewhere).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct UploadProgress {
    #[serde(default)]
    next_expected_ranges: Vec<String>,
}

impl UploadProgress {
    fn next_start(&self) -> Option<usize> {
        let first = self.next_expected_ranges.first()?;
        first.split('-').next()?.trim().parse().ok()
    }
}

/// What `GET /v1.0/me` says of the signed-in user.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GraphUser {
    /// The user's object id (`oid`).
    pub id: String,
    #[serde(default)]
    pub display_name: Option<String>,
    /// The primary SMTP address; null without an Exchange Online mailbox.
    #[serde(default)]
    pub mail: Option<String>,
    #[serde(default)]
    pub user_principal_name: Option<String>,
    /// Exchange addresses of the mailbox: `SMTP:` the primary, `smtp:` aliases.
    #[serde(default)]
    pub proxy_addresses: Vec<String>,
}

/// Sends one Graph request with a new `client-request-id`, and logs it with the
/// answer's `request-id` and `Date` (in the caller's span: the worker's
/// `provider_call`), or with the transport error when there is no answer.
async fn traced_call(
    operation: &'static str,
    request: reqwest::RequestBuilder,
) -> Result<reqwest::Response, SendError> {
    let client_request_id = uuid::Uuid::new_v4().to_string();
    let sent = request
        .header("client-request-id", &client_request_id)
        .header("return-client-request-id", "true")
        .send()
        .await;
    let response = match sent {
        Ok(r) => r,
        Err(e) => {
            let e = SendError::transport(&e);
            tracing::warn!(
                graph.operation = operation,
                graph.client_request_id = %client_request_id,
                error = %e.message,
                "Microsoft Graph call got no answer"
            );
            return Err(e);
        }
    };
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    tracing::info!(
        graph.operation = operation,
        graph.client_request_id = %client_request_id,
        graph.request_id = %header("request-id"),
        graph.date = %header("date"),
        http.status = response.status().as_u16(),
        "Microsoft Graph call"
    );
    Ok(response)
}

fn join(base: &Url, path: &str) -> Url {
    let mut s = base.as_str().trim_end_matches('/').to_owned();
    s.push('/');
    s.push_str(path);
    Url::parse(&s).expect("a valid base joined with a constant path is valid")
}

fn recipient(m: &Mailbox) -> Value {
    match &m.name {
        Some(name) => json!({"emailAddress": {"address": m.email.as_str(), "name": name}}),
        None => json!({"emailAddress": {"address": m.email.as_str()}}),
    }
}

/// Graph's error body: `{"error": {"code", "message", "innerError": {...}}}`.
#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    code: Option<String>,
    message: Option<String>,
}

/// Maps a Graph error answer to a failure class and contract code.
pub fn classify(
    status: StatusCode,
    body: &str,
    retry_after: Option<std::time::Duration>,
) -> SendError {
    let detail = serde_json::from_str::<ErrorBody>(body)
        .ok()
        .map(|b| b.error);
    let code = detail.as_ref().and_then(|d| d.code.clone());
    let message = detail
        .as_ref()
        .and_then(|d| d.message.clone())
        .unwrap_or_else(|| format!("Microsoft Graph answered {status}"));
    let mut message = message;
    let class = match (status.as_u16(), code.as_deref()) {
        (401, _) => FailureClass::Unauthorized,
        // Exchange refuses every submission of this account (outbound spam
        // policy, Restricted entities): nothing this job or the next can change
        // until the organization's admin unblocks it.
        (_, Some("ErrorMessageSubmissionBlocked")) => {
            message = format!(
                "the mailbox is blocked from sending by Exchange Online (often an outbound spam \
                 restriction: Restricted entities in the Microsoft Defender portal); an admin of \
                 the organization must unblock it. Graph said: {message}"
            );
            FailureClass::Permanent(ErrorCode::SenderNotAllowed)
        }
        // "Mailbox has exceeded maximum mailbox size": a storage quota, not a
        // sending limit, and no wait lifts it; the admin must free space.
        (_, Some("ErrorQuotaExceeded")) => {
            message = format!(
                "the sending mailbox is full (over its maximum mailbox size, not a sending \
                 limit): Exchange accepts no message from it until space is freed or its quota \
                 raised. Graph said: {message}"
            );
            FailureClass::Permanent(ErrorCode::SenderNotAllowed)
        }
        (429, _) => FailureClass::throttled(retry_after),
        (
            _,
            Some(
                "ErrorSendAsDenied"
                | "ErrorAccessDenied"
                | "MailboxNotEnabledForRESTAPI"
                | "ErrorInvalidUser",
            ),
        ) => FailureClass::Permanent(ErrorCode::SenderNotAllowed),
        (_, Some("ErrorInvalidRecipients" | "ErrorInvalidRecipientsSmtpAddress")) => {
            FailureClass::Permanent(ErrorCode::RecipientRejected)
        }
        (_, Some("ErrorMessageSizeExceeded")) | (413, _) => {
            FailureClass::Permanent(ErrorCode::MessageTooLarge)
        }
        // "The maximum request length supported is 4MB." also comes as a 400.
        (400, _)
            if message
                .to_ascii_lowercase()
                .contains("maximum request length") =>
        {
            FailureClass::Permanent(ErrorCode::MessageTooLarge)
        }
        (_, Some("ErrorSubmissionQuotaExceeded")) => {
            FailureClass::Permanent(ErrorCode::QuotaExceeded)
        }
        (_, Some("InvalidInternetMessageHeader")) => FailureClass::Permanent(ErrorCode::InvalidJob),
        (500 | 502 | 503 | 504, _) => FailureClass::unavailable(retry_after),
        (403 | 404, _) => FailureClass::Permanent(ErrorCode::SenderNotAllowed),
        (400 | 422, _) => FailureClass::Permanent(ErrorCode::InvalidJob),
        (408, _) => FailureClass::unavailable(retry_after),
        _ => FailureClass::Permanent(ErrorCode::ProviderUnavailable),
    };
    let sending_blocked = code.as_deref() == Some("ErrorMessageSubmissionBlocked");
    SendError {
        // Graph's gateway gave up waiting for the mailbox: the message may
        // have gone (facts.md, Graph 504).
        maybe_sent: status.as_u16() == 504,
        sending_blocked,
        ..SendError::new(class, message).with_provider(status.as_u16(), code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn body(code: &str) -> String {
        json!({"error": {"code": code, "message": format!("{code} message"),
            "innerError": {"date": "2026-11-28T10:15:03", "request-id": "r", "client-request-id": "c"}}})
        .to_string()
    }

    /// The job's Message-ID goes out as `internetMessageId` (RFC 5322 `msg-id`,
    /// with its angle brackets), and `saveToSentItems` is the message's choice.
    #[test]
    fn the_body_carries_the_message_id_and_the_sent_items_choice() {
        use mail_dispatch_domain::{EmailAddress, Mailbox};
        let graph = GraphSender::new(
            reqwest::Client::new(),
            &Url::parse("https://graph.microsoft.com").unwrap(),
        );
        let mailbox = |e: &str| Mailbox::new(EmailAddress::parse(e).unwrap(), None);
        let mut msg = OutgoingMessage {
            from: mailbox("n@customer.com"),
            to: vec![mailbox("a@example.org")],
            cc: vec![],
            bcc: vec![],
            reply_to: None,
            subject: "s".into(),
            text: Some("t".into()),
            html: None,
            attachments: vec![],
            headers: Default::default(),
            message_id: Some("job-1.org_42@customer.com".into()),
            save_to_sent_items: false,
        };
        let body = graph.request_body(&msg);
        assert_eq!(
            body["message"]["internetMessageId"],
            "<job-1.org_42@customer.com>"
        );
        assert_eq!(body["saveToSentItems"], false);
        msg.save_to_sent_items = true;
        msg.message_id = None;
        let body = graph.request_body(&msg);
        assert_eq!(body["saveToSentItems"], true);
        assert!(body["message"].get("internetMessageId").is_none());
    }

    /// The size check reads the request's length without encoding the
    /// attachments: it must be exactly the length of the request sent.
    #[test]
    fn request_size_is_the_length_of_the_request_without_encoding_it() {
        use mail_dispatch_domain::EmailAddress;
        let mb = |e: &str, n: Option<&str>| {
            Mailbox::new(EmailAddress::parse(e).unwrap(), n.map(str::to_owned))
        };
        let sender = GraphSender::new(
            reqwest::Client::new(),
            &Url::parse("https://graph.microsoft.com").unwrap(),
        );
        let mut msg = OutgoingMessage {
            from: mb("ops@customer.com", Some("Équipe \"Ops\"")),
            to: vec![mb("alice@example.com", None)],
            cc: vec![],
            bcc: vec![],
            reply_to: None,
            subject: "Rapport \u{1F4C4} d'activité".into(),
            text: Some("ligne 1\nligne 2\t\"fin\"".into()),
            html: None,
            attachments: vec![],
            headers: Default::default(),
            message_id: Some("job-1.org@customer.com".into()),
            save_to_sent_items: false,
        };
        let exact = |s: &GraphSender, m: &OutgoingMessage| {
            serde_json::to_vec(&s.request_body(m)).unwrap().len()
        };
        assert_eq!(sender.request_size(&msg), exact(&sender, &msg));
        for (i, len) in [0usize, 1, 2, 3, 1000, 1001].into_iter().enumerate() {
            msg.attachments.push(Attachment {
                filename: format!("pièce \"{i}\".bin"),
                content_type: "application/octet-stream".into(),
                content: vec![7u8; len].into(),
            });
            assert_eq!(sender.request_size(&msg), exact(&sender, &msg), "{i}");
        }
    }

    /// Every documented sendMail error maps to its contract code (facts.md; graph/errors).
    #[test]
    fn error_table() {
        let s = |n| StatusCode::from_u16(n).unwrap();
        let after = Some(Duration::from_secs(7));
        let table: &[(u16, &str, FailureClass)] = &[
            (
                403,
                "ErrorSendAsDenied",
                FailureClass::Permanent(ErrorCode::SenderNotAllowed),
            ),
            (
                403,
                "ErrorAccessDenied",
                FailureClass::Permanent(ErrorCode::SenderNotAllowed),
            ),
            (
                404,
                "MailboxNotEnabledForRESTAPI",
                FailureClass::Permanent(ErrorCode::SenderNotAllowed),
            ),
            (
                404,
                "ErrorInvalidUser",
                FailureClass::Permanent(ErrorCode::SenderNotAllowed),
            ),
            (
                400,
                "ErrorInvalidRecipients",
                FailureClass::Permanent(ErrorCode::RecipientRejected),
            ),
            (
                400,
                "InvalidInternetMessageHeader",
                FailureClass::Permanent(ErrorCode::InvalidJob),
            ),
            (
                400,
                "ErrorMessageSizeExceeded",
                FailureClass::Permanent(ErrorCode::MessageTooLarge),
            ),
            (
                413,
                "RequestEntityTooLarge",
                FailureClass::Permanent(ErrorCode::MessageTooLarge),
            ),
            (
                403,
                "ErrorQuotaExceeded",
                FailureClass::Permanent(ErrorCode::SenderNotAllowed),
            ),
            (
                403,
                "ErrorSubmissionQuotaExceeded",
                FailureClass::Permanent(ErrorCode::QuotaExceeded),
            ),
            (
                403,
                "ErrorMessageSubmissionBlocked",
                FailureClass::Permanent(ErrorCode::SenderNotAllowed),
            ),
            (
                401,
                "InvalidAuthenticationToken",
                FailureClass::Unauthorized,
            ),
            (429, "ApplicationThrottled", FailureClass::throttled(after)),
            (500, "generalException", FailureClass::unavailable(after)),
            (502, "", FailureClass::unavailable(after)),
            (503, "serviceNotAvailable", FailureClass::unavailable(after)),
            (504, "", FailureClass::unavailable(after)),
            (
                400,
                "BadRequest",
                FailureClass::Permanent(ErrorCode::InvalidJob),
            ),
        ];
        for (status, code, expected) in table {
            let e = classify(s(*status), &body(code), after);
            assert_eq!(e.class, *expected, "{status} {code}");
            assert_eq!(e.provider_status, Some(*status));
        }
        // Graph's size refusal as a 400: too large, not an invalid job.
        let too_long = json!({"error": {"code": "BadRequest",
            "message": "The maximum request length supported is 4MB."}})
        .to_string();
        assert_eq!(
            classify(s(400), &too_long, None).class,
            FailureClass::Permanent(ErrorCode::MessageTooLarge)
        );
        // A blocked account pauses its mailbox; a full one says it is full.
        let blocked = classify(s(403), &body("ErrorMessageSubmissionBlocked"), None);
        assert!(blocked.sending_blocked);
        assert!(
            blocked.message.contains("blocked from sending"),
            "{}",
            blocked.message
        );
        let full = classify(s(403), &body("ErrorQuotaExceeded"), None);
        assert!(!full.sending_blocked);
        assert!(full.message.contains("mailbox is full"), "{}", full.message);
        let e = classify(s(403), &body("ErrorSendAsDenied"), None);
        assert_eq!(e.provider_code.as_deref(), Some("ErrorSendAsDenied"));
        assert_eq!(e.message, "ErrorSendAsDenied message");
        // A body that is not Graph's error shape still classifies by status.
        assert_eq!(
            classify(s(503), "<html>", None).class,
            FailureClass::unavailable(None)
        );
    }
}
