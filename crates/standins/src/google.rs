//! Google OAuth (authorize, token, revoke) and Gmail (`messages.send`,
//! `settings.sendAs.list`) stand-ins, with the refusals of the real services.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use serde_json::{Value, json};
use wiremock::{Request, Respond, ResponseTemplate};

use super::faults::{
    gmail_insufficient_scope, gmail_rate_limited, gmail_unavailable, google_error,
};
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

/// Gmail `POST /gmail/v1/users/me/messages/send`.
pub(super) struct GmailSend(pub(super) Arc<Mutex<State>>);
impl Respond for GmailSend {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let mut s = self.0.lock().unwrap();
        *s.send_attempts.entry(Vendor::Google).or_default() += 1;
        s.attempt_times
            .push((Vendor::Google, std::time::Instant::now()));
        let delay = s.send_delay;
        let Some(grant) = s.bearer_grant(request, Vendor::Google) else {
            return unauthenticated();
        };
        if !allows(&grant, SEND_SCOPES) {
            return gmail_insufficient_scope(
                "caribou.api.proto.MailboxService.SendMessage",
                SEND_SCOPES,
            );
        }
        let account = grant.account;
        if let Err(wait) = s.over_limit(&account) {
            return gmail_rate_limited(wait);
        }
        if let Some(scripted) = s
            .scripted
            .get_mut(&Vendor::Google)
            .and_then(VecDeque::pop_front)
        {
            return scripted.set_delay(delay);
        }
        if s.fault_rate > 0.0 && rand::random::<f64>() < s.fault_rate {
            return gmail_unavailable().set_delay(delay);
        }
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
            s.received.push(Received {
                provider: "google",
                received_at: chrono::Utc::now(),
                id: id.clone(),
                from: addresses(msg.from()).into_iter().next().unwrap_or_default(),
                to: addresses(msg.to()),
                subject: msg.subject().unwrap_or_default().to_owned(),
            });
        }
        s.gmail_sends.push(raw);
        ResponseTemplate::new(200)
            .set_delay(delay)
            .set_body_json(json!({"id": id, "threadId": id, "labelIds": ["SENT"]}))
    }
}
