//! Google OAuth (authorize, token, revoke) and Gmail (`messages.send`,
//! `settings.sendAs.list`) stand-ins, with the refusals of the real services.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use serde_json::{Value, json};
use wiremock::{Request, Respond, ResponseTemplate};

use super::faults::{
    gmail_insufficient_scope, gmail_project_rate_limited, gmail_rate_limited, gmail_sending_limit,
    gmail_unavailable, google_error,
};
use super::quota::OverQuota;
use super::{
    AccountInfo, Consent, Grant, Received, State, Vendor, exchange_code, form, has_scope,
    normalize_scopes, redirect_back, unsigned_jwt,
};

const AUTH: &str = "https://www.googleapis.com/auth/";

/// What the product asks for (and `StandIns::issue` grants).
pub(super) const DEFAULT_SCOPES: &[&str] = &[
    "openid",
    "email",
    "https://www.googleapis.com/auth/gmail.send",
];

/// Scopes `users.messages.send` accepts
/// (https://developers.google.com/workspace/gmail/api/reference/rest/v1/users.messages/send#authorization-scopes).
const SEND_SCOPES: &[&str] = &[
    "https://mail.google.com/",
    "https://www.googleapis.com/auth/gmail.modify",
    "https://www.googleapis.com/auth/gmail.compose",
    "https://www.googleapis.com/auth/gmail.send",
];

/// Scopes `users.settings.sendAs.list` accepts
/// (https://developers.google.com/workspace/gmail/api/reference/rest/v1/users.settings.sendAs/list#authorization-scopes).
const SEND_AS_LIST_SCOPES: &[&str] = &[
    "https://mail.google.com/",
    "https://www.googleapis.com/auth/gmail.modify",
    "https://www.googleapis.com/auth/gmail.readonly",
    "https://www.googleapis.com/auth/gmail.settings.basic",
    "https://www.googleapis.com/auth/gmail.settings.sharing",
];

/// Sign-in scopes the consent screen does not let the user untick
/// (https://developers.google.com/identity/protocols/oauth2/resources/granular-permissions).
const SIGN_IN_SCOPES: &[&str] = &[
    "openid",
    "https://www.googleapis.com/auth/userinfo.email",
    "https://www.googleapis.com/auth/userinfo.profile",
];

/// Google names `email` and `profile` by their full URLs in token responses
/// (`https://www.googleapis.com/auth/userinfo.email`); other scopes are URLs already.
pub(super) fn normalize_scope(s: &str) -> String {
    match s {
        "openid" => "openid".to_owned(),
        "email" => format!("{AUTH}userinfo.email"),
        "profile" => format!("{AUTH}userinfo.profile"),
        s if s.contains("://") => s.to_owned(),
        s => format!("{AUTH}{s}"),
    }
}

/// Claims of a Google ID token
/// (https://developers.google.com/identity/openid-connect/openid-connect#an-id-tokens-payload).
fn id_token(info: &AccountInfo, account: &str, client_id: &str) -> String {
    let now = chrono::Utc::now().timestamp();
    let mut claims = json!({
        "iss": "https://accounts.google.com",
        "azp": client_id, "aud": client_id,
        "sub": info.id,
        "email": account, "email_verified": true,
        "name": info.display_name,
        "iat": now, "exp": now + 3600,
    });
    if let Some(hd) = &info.hosted_domain {
        claims["hd"] = json!(hd);
    }
    unsigned_jwt(&claims)
}

/// The authorize endpoint once the request is well formed: with granular
/// consent the grant is what the user left ticked.
pub(super) fn authorize(
    s: &mut State,
    q: &HashMap<String, String>,
    back: url::Url,
    consent: Option<Consent>,
) -> ResponseTemplate {
    let get = |k: &str| q.get(k).map(String::as_str).unwrap_or_default();
    let (account, unticked) = match consent {
        Some(Consent::Approve(a)) => (a, Vec::new()),
        Some(Consent::Partial { account, unticked }) => (account, unticked),
        Some(Consent::Deny) | None => return super::consent_denied(back, get("state")),
    };
    let unticked = normalize_scopes(Vendor::Google, &unticked.join(" "));
    let scopes: Vec<String> = normalize_scopes(Vendor::Google, get("scope"))
        .into_iter()
        .filter(|x| SIGN_IN_SCOPES.contains(&x.as_str()) || !has_scope(&unticked, x))
        .collect();
    let code = s.issue_code(Vendor::Google, account, q, scopes);
    redirect_back(back, &[("code", &code), ("state", get("state"))])
}

/// `POST /token`: authorization-code and refresh-token grants
/// (https://developers.google.com/identity/protocols/oauth2/web-server#exchange-authorization-code).
pub(super) struct Token(pub(super) Arc<Mutex<State>>);
impl Respond for Token {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let mut s = self.0.lock().unwrap();
        let f = form(request);
        s.token_requests.push((Vendor::Google, f.clone()));
        let delay = s.token_delay;
        if f.get("grant_type").map(String::as_str) == Some("authorization_code") {
            return match exchange_code(&mut s, Vendor::Google, &f) {
                Ok(issued) => {
                    let grant = Grant {
                        vendor: Vendor::Google,
                        account: issued.account.clone(),
                        scopes: issued.scopes.clone(),
                    };
                    let access = s.mint_access(grant.clone());
                    let refresh = s.mint_refresh(grant);
                    let mut body = json!({
                        "access_token": access, "expires_in": 3599, "refresh_token": refresh,
                        "scope": issued.scopes.join(" "), "token_type": "Bearer",
                    });
                    if has_scope(&issued.scopes, "openid") {
                        let info = s.account_info(&issued.account);
                        body["id_token"] =
                            json!(id_token(&info, &issued.account, &issued.client_id));
                    }
                    ResponseTemplate::new(200).set_body_json(body)
                }
                Err(_) => ResponseTemplate::new(400).set_body_json(
                    json!({"error": "invalid_grant", "error_description": "Bad Request"}),
                ),
            };
        }
        let grant = f
            .get("refresh_token")
            .and_then(|t| s.refresh.get(t))
            .cloned()
            .filter(|g| g.vendor == Vendor::Google);
        match grant {
            // Revoked, expired, or failed on purpose: invalid_grant
            // (https://developers.google.com/identity/protocols/oauth2#expiration).
            Some(g)
                if !s.revoked_accounts.contains(&g.account)
                    && !s.refresh_failures.contains_key(&g.account) =>
            {
                let scope = g.scopes.join(" ");
                let access = s.mint_access(g);
                // No new refresh token: Google's do not rotate.
                ResponseTemplate::new(200).set_delay(delay).set_body_json(json!({
                    "access_token": access, "expires_in": 3599,
                    "scope": scope, "token_type": "Bearer",
                }))
            }
            _ => ResponseTemplate::new(400)
                .set_body_json(json!({"error": "invalid_grant", "error_description": "Token has been expired or revoked."})),
        }
    }
}

/// `POST /revoke` (https://developers.google.com/identity/protocols/oauth2/web-server#tokenrevoke).
pub(super) struct Revoke(pub(super) Arc<Mutex<State>>);
impl Respond for Revoke {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let mut s = self.0.lock().unwrap();
        let token = form(request).get("token").cloned().or_else(|| {
            request
                .url
                .query_pairs()
                .find(|(k, _)| k == "token")
                .map(|(_, v)| v.into_owned())
        });
        match token {
            Some(t) if s.refresh.contains_key(&t) || s.access.contains_key(&t) => {
                s.revocations.push(t.clone());
                if let Some(g) = s.refresh.get(&t).cloned() {
                    s.revoked_accounts.insert(g.account);
                }
                ResponseTemplate::new(200)
            }
            _ => ResponseTemplate::new(400).set_body_json(
                json!({"error": "invalid_token", "error_description": "Token expired or revoked"}),
            ),
        }
    }
}

fn unauthenticated() -> ResponseTemplate {
    google_error(
        401,
        "authError",
        "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential.",
        "UNAUTHENTICATED",
    )
    .insert_header(
        "WWW-Authenticate",
        "Bearer realm=\"https://accounts.google.com/\", error=\"invalid_token\"",
    )
}

fn allows(grant: &Grant, accepted: &[&str]) -> bool {
    accepted.iter().any(|a| has_scope(&grant.scopes, a))
}

/// Gmail `GET /gmail/v1/users/me/settings/sendAs`.
pub(super) struct GmailSendAs(pub(super) Arc<Mutex<State>>);
impl Respond for GmailSendAs {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let s = self.0.lock().unwrap();
        let Some(grant) = s.bearer_grant(request, Vendor::Google) else {
            return unauthenticated();
        };
        if !allows(&grant, SEND_AS_LIST_SCOPES) {
            return gmail_insufficient_scope(
                "caribou.api.proto.MailboxService.ListSendAs",
                SEND_AS_LIST_SCOPES,
            );
        }
        let account = grant.account;
        let mut list = vec![
            json!({"sendAsEmail": account, "displayName": "", "replyToAddress": "",
                   "signature": "", "isPrimary": true, "isDefault": true}),
        ];
        for alias in s.aliases.get(&account).cloned().unwrap_or_default() {
            list.push(json!({"sendAsEmail": alias, "displayName": "Alias", "replyToAddress": "", "signature": "",
                             "isPrimary": false, "isDefault": false, "treatAsAlias": true,
                             "verificationStatus": "accepted"}));
        }
        ResponseTemplate::new(200).set_body_json(json!({"sendAs": list}))
    }
}

/// Gmail's largest message (users.messages.send: "Maximum file size: 35MB").
pub(super) const MAX_MESSAGE_BYTES: usize = 35 * 1024 * 1024;
/// `uploadType=media` is for "smaller files, for example, 5 MB or less"; larger
/// simple uploads are refused by Google's front end with a bare 413.
pub(super) const MAX_SIMPLE_UPLOAD_BYTES: usize = 5 * 1024 * 1024;
/// Resumable chunks other than the last are multiples of 256 KiB.
const CHUNK_GRANULE: usize = 256 * 1024;

/// What every Gmail send checks before taking the message: the token, its
/// scopes, the mailbox's rate, then a scripted answer or an injected fault.
/// Counts the attempt.
/// The checks of a send, in Gmail's order; `Ok(account)` when it may go on.
#[expect(
    clippy::result_large_err,
    reason = "the refusal is the stand-in's answer, built once per request"
)]
fn send_checks(s: &mut State, request: &Request) -> Result<String, ResponseTemplate> {
    *s.send_attempts.entry(Vendor::Google).or_default() += 1;
    s.attempt_times
        .push((Vendor::Google, std::time::Instant::now()));
    let delay = s.send_delay;
    let Some(grant) = s.bearer_grant(request, Vendor::Google) else {
        return Err(unauthenticated());
    };
    if !allows(&grant, SEND_SCOPES) {
        return Err(gmail_insufficient_scope(
            "caribou.api.proto.MailboxService.SendMessage",
            SEND_SCOPES,
        ));
    }
    if s.gmail_project_exhausted_until
        .is_some_and(|until| std::time::Instant::now() < until)
    {
        *s.gmail_project_throttled
            .entry(grant.account.clone())
            .or_default() += 1;
        return Err(gmail_project_rate_limited());
    }
    if let Err(wait) = s.over_limit(&grant.account) {
        return Err(gmail_rate_limited(wait));
    }
    if let Some(scripted) = s
        .scripted
        .get_mut(&Vendor::Google)
        .and_then(VecDeque::pop_front)
    {
        return Err(scripted.set_delay(delay));
    }
    if s.fault_rate > 0.0 && rand::random::<f64>() < s.fault_rate {
        return Err(gmail_unavailable().set_delay(delay));
    }
    Ok(grant.account)
}

/// Takes a complete message of `account`: within the user's sending limits,
/// records it and answers with its Message resource.
fn accept(s: &mut State, account: &str, raw: Vec<u8>) -> ResponseTemplate {
    let id = format!("{:016x}", rand::random::<u64>());
    if let Some(msg) = mail_parser::MessageParser::default().parse(&raw) {
        let addresses = |a: Option<&mail_parser::Address>| {
            a.map(|a| {
                a.iter()
                    .filter_map(|x| x.address().map(str::to_owned))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
        };
        let from = msg.from().and_then(|a| a.first());
        let from_address = from
            .and_then(|f| f.address())
            .unwrap_or_default()
            .to_owned();
        // Gmail sends from the account or one of its verified send-as aliases;
        // any other From is silently replaced by the account's address, and the
        // send still succeeds (googleapis/google-api-php-client#2393; the sendAs
        // resource: "Send mail as").
        let verified = from_address.eq_ignore_ascii_case(account)
            || s.aliases
                .get(account)
                .is_some_and(|a| a.iter().any(|x| x.eq_ignore_ascii_case(&from_address)));
        let seen_from = super::SeenMailbox {
            name: from.and_then(|f| f.name()).map(str::to_owned),
            address: if verified {
                from_address.clone()
            } else {
                account.to_owned()
            },
        };
        // Gmail keeps the Message-ID it is given, and adds one when there is none.
        let message_id = msg
            .message_id()
            .map_or_else(|| format!("<CA{id}@mail.gmail.com>"), |m| format!("<{m}>"));
        if let Some(quota) = s.sending_quotas.get_mut(&account.to_ascii_lowercase()) {
            let all: Vec<String> = [msg.to(), msg.cc(), msg.bcc()]
                .into_iter()
                .flat_map(addresses)
                .collect();
            if let Err(OverQuota(wait)) = quota.take(account, &all, true) {
                return gmail_sending_limit(wait);
            }
        }
        s.received.push(Received {
            provider: "google",
            received_at: chrono::Utc::now(),
            id: id.clone(),
            from: from_address,
            to: addresses(msg.to()),
            subject: msg.subject().unwrap_or_default().to_owned(),
            seen_from,
            seen_sender: None,
            message_id,
        });
    }
    s.gmail_sends.push(raw);
    ResponseTemplate::new(200)
        .set_delay(s.send_delay)
        .set_body_json(json!({"id": id, "threadId": id, "labelIds": ["SENT"]}))
}

/// Gmail `POST /gmail/v1/users/me/messages/send`.
pub(super) struct GmailSend(pub(super) Arc<Mutex<State>>);
impl Respond for GmailSend {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let mut s = self.0.lock().unwrap();
        let account = match send_checks(&mut s, request) {
            Ok(account) => account,
            Err(answer) => return answer,
        };
        let raw = serde_json::from_slice::<Value>(&request.body)
            .ok()
            .and_then(|v| v["raw"].as_str().map(str::to_owned))
            .and_then(|r| {
                base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(r.trim_end_matches('='))
                    .ok()
            });
        let Some(raw) = raw else {
            return google_error(
                400,
                "invalidArgument",
                "'raw' RFC822 payload message string or uploading message via /upload/* URL required",
                "INVALID_ARGUMENT",
            );
        };
        accept(&mut s, &account, raw)
    }
}

/// A resumable upload in progress.
pub(super) struct UploadSession {
    /// The account whose token opened the session (the session URI is the
    /// credential of its chunks).
    account: String,
    total: usize,
    data: Vec<u8>,
    /// The answer to the last chunk, once the message is complete (and sent).
    done: Option<ResponseTemplate>,
}

fn query(request: &Request, name: &str) -> Option<String> {
    request
        .url
        .query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

fn header<'r>(request: &'r Request, name: &str) -> Option<&'r str> {
    request.headers.get(name).and_then(|v| v.to_str().ok())
}

fn too_large() -> ResponseTemplate {
    // Google's front end answers an oversized upload with a bare 413 page.
    ResponseTemplate::new(413)
        .insert_header("Content-Type", "text/html; charset=UTF-8")
        .set_body_string("<!DOCTYPE html><title>Error 413 (Request Entity Too Large)!!1</title><p><b>413.</b> <ins>That’s an error.</ins><p>Your client issued a request that was too large. <ins>That’s all we know.</ins>")
}

/// Gmail `POST /upload/gmail/v1/users/me/messages/send`: a simple upload
/// (`uploadType=media`, the message as the body) or the start of a resumable one
/// (`uploadType=resumable`, answered with the session URI in `Location`).
pub(super) struct GmailUploadStart(pub(super) Arc<Mutex<State>>);
impl Respond for GmailUploadStart {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let mut s = self.0.lock().unwrap();
        match query(request, "uploadType").as_deref() {
            Some("media") => {
                if request.body.len() > MAX_SIMPLE_UPLOAD_BYTES {
                    return too_large();
                }
                let account = match send_checks(&mut s, request) {
                    Ok(account) => account,
                    Err(answer) => return answer,
                };
                let media = header(request, "content-type").unwrap_or("application/octet-stream");
                if !media.starts_with("message/") {
                    return google_error(
                        400,
                        "badContent",
                        &format!(
                            "Media type '{media}' is not supported. Valid media types: [message/*]"
                        ),
                        "INVALID_ARGUMENT",
                    );
                }
                accept(&mut s, &account, request.body.clone())
            }
            Some("resumable") => {
                let account = match send_checks(&mut s, request) {
                    Ok(account) => account,
                    Err(answer) => return answer,
                };
                let media =
                    header(request, "x-upload-content-type").unwrap_or("application/octet-stream");
                if !media.starts_with("message/") {
                    return google_error(
                        400,
                        "badContent",
                        &format!(
                            "Media type '{media}' is not supported. Valid media types: [message/*]"
                        ),
                        "INVALID_ARGUMENT",
                    );
                }
                let Some(total) = header(request, "x-upload-content-length")
                    .and_then(|v| v.parse::<usize>().ok())
                else {
                    return google_error(
                        400,
                        "invalid",
                        "X-Upload-Content-Length is required",
                        "INVALID_ARGUMENT",
                    );
                };
                if total > MAX_MESSAGE_BYTES {
                    return too_large();
                }
                let id = format!("ADPycd{:016x}", rand::random::<u64>());
                s.gmail_uploads.insert(
                    id.clone(),
                    UploadSession {
                        account,
                        total,
                        data: Vec::with_capacity(total),
                        done: None,
                    },
                );
                // wiremock's `url` has no authority: the Host header has it.
                let host = header(request, "host").unwrap_or("localhost");
                let location = format!(
                    "http://{host}{}?uploadType=resumable&upload_id={id}",
                    request.url.path()
                );
                ResponseTemplate::new(200).insert_header("Location", location.as_str())
            }
            _ => google_error(
                400,
                "badRequest",
                "Upload requests must include an uploadType URL parameter and a URL path beginning with /upload/",
                "INVALID_ARGUMENT",
            ),
        }
    }
}

/// `PUT` on a resumable upload session: a chunk (`Content-Range: bytes a-b/N`) or
/// a status query (`Content-Range: bytes */N`). `308` with `Range: bytes=0-n`
/// while incomplete; the last chunk sends the message.
pub(super) struct GmailUploadChunk(pub(super) Arc<Mutex<State>>);
impl Respond for GmailUploadChunk {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let mut guard = self.0.lock().unwrap();
        let s = &mut *guard;
        let Some(session) = query(request, "upload_id").and_then(|id| s.gmail_uploads.get_mut(&id))
        else {
            return google_error(404, "notFound", "Upload session not found", "NOT_FOUND");
        };
        let incomplete = |received: usize| {
            let r = ResponseTemplate::new(308);
            if received == 0 {
                r
            } else {
                r.insert_header("Range", format!("bytes=0-{}", received - 1).as_str())
            }
        };
        let range = header(request, "content-range")
            .unwrap_or_default()
            .to_owned();
        let Some(spec) = range.strip_prefix("bytes ") else {
            return google_error(
                400,
                "invalid",
                "Content-Range is required",
                "INVALID_ARGUMENT",
            );
        };
        if let Some(done) = &session.done {
            return done.clone();
        }
        if spec.starts_with("*/") {
            return incomplete(session.data.len());
        }
        let parsed = spec.split_once('/').and_then(|(span, total)| {
            let (a, b) = span.split_once('-')?;
            Some((
                a.parse::<usize>().ok()?,
                b.parse::<usize>().ok()?,
                total.parse::<usize>().ok()?,
            ))
        });
        let Some((first, last, total)) = parsed else {
            return google_error(
                400,
                "invalid",
                "Content-Range is not valid",
                "INVALID_ARGUMENT",
            );
        };
        if total != session.total || last < first || last - first + 1 != request.body.len() {
            return google_error(
                400,
                "invalid",
                "Content-Range does not match the upload",
                "INVALID_ARGUMENT",
            );
        }
        if first != session.data.len() {
            // Not where the session stands: it says where it does.
            return incomplete(session.data.len());
        }
        let is_last = last + 1 == total;
        if !is_last && !request.body.len().is_multiple_of(CHUNK_GRANULE) {
            return google_error(
                400,
                "invalid",
                "Invalid request. The number of bytes uploaded is required to be a multiple of 262144, except for the final request.",
                "INVALID_ARGUMENT",
            );
        }
        session.data.extend_from_slice(&request.body);
        if !is_last {
            return incomplete(session.data.len());
        }
        let raw = std::mem::take(&mut session.data);
        let account = session.account.clone();
        let id = query(request, "upload_id").unwrap_or_default();
        let answer = accept(s, &account, raw);
        if let Some(session) = s.gmail_uploads.get_mut(&id) {
            session.done = Some(answer.clone());
        }
        answer
    }
}
