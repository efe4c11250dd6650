//! Microsoft Graph drafts and attachment upload sessions: the documented way
//! past `sendMail`'s 4 MB request limit
//! (https://learn.microsoft.com/graph/outlook-large-attachments):
//!
//! - `POST /v1.0/me/messages` creates a draft (`201`, the message with its `id`);
//! - `POST /v1.0/me/messages/{id}/attachments` adds a `fileAttachment` in one request;
//! - `POST /v1.0/me/messages/{id}/attachments/createUploadSession` with
//!   `{"AttachmentItem": {"attachmentType": "file", "name", "size"}}` answers `201`
//!   `{"uploadUrl", "expirationDateTime", "nextExpectedRanges": ["0"]}`
//!   (https://learn.microsoft.com/graph/api/attachment-createuploadsession; files
//!   of up to 150 MB);
//! - `PUT {uploadUrl}` with `Content-Range: bytes a-b/size`, at most 4 MB a time,
//!   in order, without `Authorization` (the URL is pre-authenticated): `200`
//!   `{"expirationDateTime", "nextExpectedRanges": ["{next}"]}` (Outlook gives a
//!   single start, https://learn.microsoft.com/graph/api/resources/uploadsession),
//!   `201` with the attachment's URL in `Location` after the last byte; each
//!   fragment extends the session's expiry;
//! - `POST /v1.0/me/messages/{id}/send` (`202`, https://learn.microsoft.com/graph/api/message-send);
//! - `DELETE /v1.0/me/messages/{id}` (`204`).
//!
//! Drafts need `Mail.ReadWrite`; sending one needs `Mail.Send`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};
use wiremock::{Request, Respond, ResponseTemplate};

use super::faults::{graph_access_denied, graph_error, graph_submission_blocked, graph_throttled};
use super::microsoft::{GRAPH, MAIL_SEND, accept_message};
use super::{Grant, State, Vendor, has_scope};

/// Graph's request size limit, 4 MB: also each upload fragment's.
const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;
/// The largest file an upload session takes.
const MAX_UPLOAD_SESSION_BYTES: usize = 150 * 1024 * 1024;
/// Exchange Online's default maximum message size, 35 MB
/// (https://learn.microsoft.com/office365/servicedescriptions/exchange-online-service-description/exchange-online-limits#message-limits),
/// counted on the message as sent, attachments in base64.
pub(super) const DEFAULT_MAX_MESSAGE_BYTES: usize = 35 * 1024 * 1024;
/// How long an upload session lives without a fragment (Graph says only that
/// `expirationDateTime` bounds it and that each fragment extends it).
pub(super) const DEFAULT_UPLOAD_TTL: Duration = Duration::from_secs(15 * 60);

/// A draft message of a mailbox.
pub(super) struct Draft {
    account: String,
    message: Value,
    /// `fileAttachment` objects, `contentBytes` in base64.
    attachments: Vec<Value>,
    /// Raw attachment bytes, for the message size.
    attachment_bytes: usize,
}

/// An attachment upload session, keyed by the token in its URL.
pub(super) struct UploadSession {
    draft: String,
    name: String,
    content_type: String,
    size: usize,
    data: Vec<u8>,
    expires: Instant,
}

fn is_read_write(grant: &Grant) -> bool {
    ["Mail.ReadWrite"]
        .iter()
        .any(|p| has_scope(&grant.scopes, &format!("{GRAPH}{p}")))
}

fn not_found() -> ResponseTemplate {
    graph_error(
        404,
        "ErrorItemNotFound",
        "The specified object was not found in the store.",
    )
}

fn too_large() -> ResponseTemplate {
    graph_error(
        413,
        "RequestEntityTooLarge",
        "The maximum request length supported is 4MB.",
    )
}

fn expiry(ttl: Duration) -> String {
    (chrono::Utc::now() + chrono::Duration::from_std(ttl).unwrap_or_default())
        .format("%Y-%m-%dT%H:%M:%S%.3fZ")
        .to_string()
}

/// `POST`/`DELETE` under `/v1.0/me/messages`.
pub(super) struct GraphDrafts(pub(super) Arc<Mutex<State>>);
impl Respond for GraphDrafts {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let mut s = self.0.lock().unwrap();
        let delay = s.send_delay;
        if request.body.len() > MAX_REQUEST_BYTES {
            return too_large();
        }
        let Some(grant) = s.bearer_grant(request, Vendor::Microsoft) else {
            return graph_error(
                401,
                "InvalidAuthenticationToken",
                "Access token has expired or is not yet valid.",
            );
        };
        let rest: Vec<String> = request
            .url
            .path()
            .trim_start_matches("/v1.0/me/messages")
            .split('/')
            .filter(|p| !p.is_empty())
            .map(str::to_owned)
            .collect();
        let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
        let method = request.method.as_str();
        // Sending a draft needs Mail.Send (message-send#permissions); everything
        // else here reads or writes the mailbox: Mail.ReadWrite
        // (message-post-attachments, attachment-createuploadsession, user-post-messages).
        let allowed = match (method, rest.as_slice()) {
            ("POST", [_, "send"]) => MAIL_SEND
                .iter()
                .any(|p| has_scope(&grant.scopes, &format!("{GRAPH}{p}"))),
            _ => is_read_write(&grant),
        };
        if !allowed {
            return graph_access_denied();
        }
        // Every Graph call of a mailbox counts against its concurrent requests.
        if s.enter_graph(&grant.account, delay).is_err() {
            return graph_throttled(super::faults::CONCURRENCY_RETRY_AFTER_SECS);
        }
        let answer = match (method, rest.as_slice()) {
            ("POST", []) => create(&mut s, request, &grant),
            ("POST", [id, "attachments"]) => attach(&mut s, request, &grant, id),
            ("POST", [id, "attachments", "createUploadSession"]) => {
                open_session(&mut s, request, &grant, id)
            }
            ("POST", [id, "send"]) => send(&mut s, &grant, id),
            ("DELETE", [id]) => delete(&mut s, &grant, id),
            _ => graph_error(
                405,
                "Request_BadRequest",
                "Specified HTTP method is not allowed for the request target.",
            ),
        };
        answer.set_delay(delay)
    }
}

fn draft_of<'a>(s: &'a mut State, grant: &Grant, id: &str) -> Option<&'a mut Draft> {
    s.graph_drafts
        .get_mut(id)
        .filter(|d| d.account.eq_ignore_ascii_case(&grant.account))
}

fn create(s: &mut State, request: &Request, grant: &Grant) -> ResponseTemplate {
    let Ok(Value::Object(mut message)) = serde_json::from_slice::<Value>(&request.body) else {
        return graph_error(400, "BadRequest", "Unable to read JSON request payload.");
    };
    if message.contains_key("attachments") {
        // Accepted by Graph too, but then the request carries them: keep the
        // stand-in's drafts to the documented large-message path.
        return graph_error(
            400,
            "BadRequest",
            "The stand-in takes attachments through the attachments endpoints.",
        );
    }
    let id = format!("AAMkAD{}", uuid::Uuid::new_v4().simple());
    message.insert("id".into(), json!(id));
    message.insert("isDraft".into(), json!(true));
    let body = Value::Object(message.clone());
    s.graph_drafts.insert(
        id,
        Draft {
            account: grant.account.clone(),
            message: body.clone(),
            attachments: vec![],
            attachment_bytes: 0,
        },
    );
    ResponseTemplate::new(201).set_body_json(body)
}

fn attach(s: &mut State, request: &Request, grant: &Grant, id: &str) -> ResponseTemplate {
    let Ok(body) = serde_json::from_slice::<Value>(&request.body) else {
        return graph_error(400, "BadRequest", "Unable to read JSON request payload.");
    };
    if body["@odata.type"] != "#microsoft.graph.fileAttachment" {
        return graph_error(
            400,
            "BadRequest",
            "A type named 'microsoft.graph.attachment' could not be resolved by the model.",
        );
    }
    let Some(bytes) = body["contentBytes"]
        .as_str()
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
    else {
        return graph_error(
            400,
            "ErrorInvalidRequest",
            "The contentBytes property is not valid base64.",
        );
    };
    let Some(draft) = draft_of(s, grant, id) else {
        return not_found();
    };
    let attachment_id = format!("AAMkADatt{}", uuid::Uuid::new_v4().simple());
    let mut attachment = body.clone();
    attachment["id"] = json!(attachment_id);
    attachment["size"] = json!(bytes.len());
    draft.attachment_bytes += bytes.len();
    draft.attachments.push(attachment.clone());
    ResponseTemplate::new(201).set_body_json(attachment)
}

fn open_session(s: &mut State, request: &Request, grant: &Grant, id: &str) -> ResponseTemplate {
    let Ok(body) = serde_json::from_slice::<Value>(&request.body) else {
        return graph_error(400, "BadRequest", "Unable to read JSON request payload.");
    };
    let item = &body["AttachmentItem"];
    if item["attachmentType"] != "file" {
        return graph_error(
            400,
            "ErrorInvalidRequest",
            "AttachmentItem.attachmentType must be 'file'.",
        );
    }
    let (Some(name), Some(size)) = (item["name"].as_str(), item["size"].as_u64()) else {
        return graph_error(
            400,
            "ErrorInvalidRequest",
            "AttachmentItem needs a name and a size.",
        );
    };
    let size = size as usize;
    if size == 0 || size > MAX_UPLOAD_SESSION_BYTES {
        return graph_error(
            400,
            "ErrorInvalidRequest",
            &format!(
                "The attachment size {size} is not within the limits of an upload session (1 byte to 150 MB)."
            ),
        );
    }
    let content_type = item["contentType"]
        .as_str()
        .unwrap_or("application/octet-stream")
        .to_owned();
    let name = name.to_owned();
    if draft_of(s, grant, id).is_none() {
        return not_found();
    }
    let ttl = s.graph_upload_ttl.unwrap_or(DEFAULT_UPLOAD_TTL);
    let token = uuid::Uuid::new_v4().simple().to_string();
    s.graph_upload_sessions.insert(
        token.clone(),
        UploadSession {
            draft: id.to_owned(),
            name,
            content_type,
            size,
            data: Vec::new(),
            expires: Instant::now() + ttl,
        },
    );
    // The real URL is on outlook.office.com with its own token; this one points
    // back at the stand-in.
    // wiremock's request URL lacks the port: the Host header has it.
    let host = request
        .headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost");
    let base = format!("{}://{host}", request.url.scheme());
    ResponseTemplate::new(201).set_body_json(json!({
        "@odata.context": "https://graph.microsoft.com/v1.0/$metadata#microsoft.graph.uploadSession",
        "uploadUrl": format!("{base}/upload/outlook/{token}"),
        "expirationDateTime": expiry(ttl),
        "nextExpectedRanges": ["0"],
    }))
}

/// Exchange's size of the message as it will leave: its JSON without the
/// attachments, and the attachments in base64.
fn message_size(d: &Draft) -> usize {
    serde_json::to_vec(&d.message).map_or(0, |v| v.len()) + d.attachment_bytes.div_ceil(3) * 4
}

fn send(s: &mut State, grant: &Grant, id: &str) -> ResponseTemplate {
    *s.send_attempts.entry(Vendor::Microsoft).or_default() += 1;
    s.attempt_times
        .push((Vendor::Microsoft, std::time::Instant::now()));
    let max = s
        .graph_max_message_bytes
        .unwrap_or(DEFAULT_MAX_MESSAGE_BYTES);
    if let Some(scripted) = s
        .scripted
        .get_mut(&Vendor::Microsoft)
        .and_then(VecDeque::pop_front)
    {
        return scripted;
    }
    // Exchange refuses the submission of a blocked account, by whichever path.
    if s.graph_blocked
        .contains(&grant.account.to_ascii_lowercase())
    {
        return graph_submission_blocked();
    }
    let Some(draft) = draft_of(s, grant, id) else {
        return not_found();
    };
    if message_size(draft) > max {
        return graph_error(
            400,
            "ErrorMessageSizeExceeded",
            "The message exceeds the maximum supported size.",
        );
    }
    let mut message = draft.message.clone();
    if let Some(m) = message.as_object_mut() {
        m.remove("id");
        m.remove("isDraft");
        if !draft.attachments.is_empty() {
            m.insert(
                "attachments".into(),
                Value::Array(draft.attachments.clone()),
            );
        }
    }
    // A sent draft lands in Sent Items (message-send has no saveToSentItems);
    // from here on it is checked and recorded as a sendMail body would be.
    let before = s.graph_sends.len();
    let answer = accept_message(
        s,
        json!({"message": message, "saveToSentItems": true}),
        grant,
        grant.account.clone(),
    );
    // A refused send leaves the draft in Drafts.
    if s.graph_sends.len() > before {
        s.graph_drafts.remove(id);
    }
    answer
}

fn delete(s: &mut State, grant: &Grant, id: &str) -> ResponseTemplate {
    if draft_of(s, grant, id).is_none() {
        return not_found();
    }
    s.graph_drafts.remove(id);
    s.graph_upload_sessions.retain(|_, u| u.draft != id);
    s.graph_deleted_drafts.push(id.to_owned());
    ResponseTemplate::new(204)
}

/// `bytes a-b/total`.
fn content_range(request: &Request) -> Option<(usize, usize, usize)> {
    let v = request.headers.get("content-range")?.to_str().ok()?;
    let (range, total) = v.strip_prefix("bytes ")?.split_once('/')?;
    let (a, b) = range.split_once('-')?;
    Some((a.parse().ok()?, b.parse().ok()?, total.parse().ok()?))
}

/// `PUT {uploadUrl}`.
pub(super) struct GraphUpload(pub(super) Arc<Mutex<State>>);
impl Respond for GraphUpload {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let mut s = self.0.lock().unwrap();
        let ttl = s.graph_upload_ttl.unwrap_or(DEFAULT_UPLOAD_TTL);
        if let Some(scripted) = s.graph_upload_script.pop_front() {
            return scripted;
        }
        // "Do not specify an Authorization request header": the URL carries its
        // own token, and a bearer token may get a 401
        // (https://learn.microsoft.com/graph/outlook-large-attachments, step 2;
        // https://learn.microsoft.com/graph/api/driveitem-createuploadsession).
        if request.headers.contains_key("authorization") {
            return graph_error(
                401,
                "InvalidAuthenticationToken",
                "The upload URL is pre-authenticated: the request must not carry an Authorization header.",
            );
        }
        if request.body.len() > MAX_REQUEST_BYTES {
            return too_large();
        }
        let token = request
            .url
            .path()
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        let Some(session) = s.graph_upload_sessions.get(&token) else {
            return not_found();
        };
        if session.expires <= Instant::now() {
            s.graph_upload_sessions.remove(&token);
            return not_found();
        }
        let Some((a, b, total)) = content_range(request) else {
            return graph_error(
                400,
                "ErrorInvalidRequest",
                "The Content-Range header is missing or malformed.",
            );
        };
        if total != session.size || b < a || b >= total {
            return graph_error(
                400,
                "ErrorInvalidRequest",
                "The Content-Range header does not match the upload session's size.",
            );
        }
        if b - a + 1 != request.body.len() {
            return graph_error(
                400,
                "ErrorInvalidRequest",
                "The Content-Range header length does not match the provided number of bytes.",
            );
        }
        // Fragments go in order, from the next expected byte
        // (as OneDrive answers it: OneDrive/onedrive-api-docs#79).
        if a != session.data.len() {
            let next = session.data.len();
            return ResponseTemplate::new(416).set_body_json(json!({"error": {
                "code": "InvalidRange",
                "message": format!("Uploaded fragment is out of order: the next expected byte is {next}."),
            }}));
        }
        let session = s.graph_upload_sessions.get_mut(&token).expect("found");
        session.data.extend_from_slice(&request.body);
        session.expires = Instant::now() + ttl;
        if session.data.len() < session.size {
            let next = session.data.len().to_string();
            return ResponseTemplate::new(200).set_body_json(json!({
                "expirationDateTime": expiry(ttl),
                "nextExpectedRanges": [next],
            }));
        }
        let session = s.graph_upload_sessions.remove(&token).expect("found");
        let Some(draft) = s.graph_drafts.get_mut(&session.draft) else {
            return not_found();
        };
        let attachment_id = format!("AAMkADatt{}", uuid::Uuid::new_v4().simple());
        draft.attachment_bytes += session.data.len();
        draft.attachments.push(json!({
            "@odata.type": "#microsoft.graph.fileAttachment",
            "id": attachment_id,
            "name": session.name,
            "contentType": session.content_type,
            "size": session.data.len(),
            "contentBytes": base64::engine::general_purpose::STANDARD.encode(&session.data),
        }));
        let location = format!(
            "https://outlook.office.com/api/v2.0/Users('{}')/Messages('{}')/Attachments('{attachment_id}')",
            draft.account, session.draft
        );
        ResponseTemplate::new(201).insert_header("Location", location.as_str())
    }
}
