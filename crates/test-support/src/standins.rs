//! Local stand-ins of Microsoft and Google, answering as the official docs show.
//!
//! - Microsoft identity platform token endpoint, `POST /{tenant}/oauth2/v2.0/token`
//!   (learn.microsoft.com/en-us/entra/identity-platform/v2-oauth2-auth-code-flow):
//!   success `{"token_type":"Bearer","scope","expires_in","ext_expires_in","access_token","refresh_token"}`
//!   — a new refresh token on every refresh; errors
//!   `{"error","error_description","error_codes","timestamp","trace_id","correlation_id","error_uri"}`.
//! - Microsoft Graph `POST /v1.0/me/sendMail` (learn.microsoft.com/en-us/graph/api/user-sendmail):
//!   `202 Accepted`, empty body, `request-id` and `client-request-id` headers; errors
//!   `{"error":{"code","message","innerError":{"date","request-id","client-request-id"}}}`.
//! - Google token endpoint `POST /token` (developers.google.com/identity/protocols/oauth2/web-server):
//!   success `{"access_token","expires_in","scope","token_type"}` (no new refresh token
//!   on refresh); error `{"error":"invalid_grant","error_description":"Token has been expired or revoked."}`.
//! - Gmail `POST /gmail/v1/users/me/messages/send` (developers.google.com/gmail/api/reference/rest/v1/users.messages/send):
//!   `200` with a Message `{"id","threadId","labelIds":["SENT"]}`; errors
//!   `{"error":{"code","message","errors":[{"message","domain","reason"}],"status"}}`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};
use wiremock::matchers::{method, path, path_regex};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

/// Which stand-in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Vendor {
    Microsoft,
    Google,
}

/// How the stand-in's consent page answers.
#[derive(Clone, Debug)]
pub enum Consent {
    /// The user signs in as this account and approves.
    Approve(String),
    /// The user refuses (`error=access_denied`).
    Deny,
}

/// An authorization code issued by a consent page, waiting for its exchange.
#[derive(Clone, Debug)]
struct IssuedCode {
    vendor: Vendor,
    account: String,
    challenge: String,
    redirect_uri: String,
    client_id: String,
    scope: String,
}

/// A message a stand-in accepted, summarized for people (the sandbox's pages).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Received {
    pub provider: &'static str,
    pub received_at: chrono::DateTime<chrono::Utc>,
    pub id: String,
    pub from: String,
    pub to: Vec<String>,
    pub subject: String,
}

#[derive(Default)]
struct State {
    received: Vec<Received>,
    /// Probability that a send answers 503 (fault injection).
    fault_rate: f64,
    consent: HashMap<Vendor, Consent>,
    codes: HashMap<String, IssuedCode>,
    authorize_requests: Vec<(Vendor, HashMap<String, String>)>,
    aliases: HashMap<String, Vec<String>>,
    counter: u64,
    /// access token → (vendor, account)
    access: HashMap<String, (Vendor, String)>,
    /// refresh token → (vendor, account)
    refresh: HashMap<String, (Vendor, String)>,
    revoked_accounts: HashSet<String>,
    token_requests: Vec<(Vendor, HashMap<String, String>)>,
    revocations: Vec<String>,
    graph_sends: Vec<Value>,
    gmail_sends: Vec<Vec<u8>>,
    send_attempts: HashMap<Vendor, u32>,
    attempt_times: Vec<(Vendor, std::time::Instant)>,
    scripted: HashMap<Vendor, VecDeque<ResponseTemplate>>,
    send_delay: Duration,
    token_delay: Duration,
    /// Per-mailbox send limits (account → bucket), as a provider enforces them.
    mailbox_limits: HashMap<String, MailboxLimit>,
}

/// A token bucket: `per_second` sends, with a burst of one second's worth.
struct MailboxLimit {
    per_second: f64,
    tokens: f64,
    refilled: std::time::Instant,
    throttled: u64,
}

impl MailboxLimit {
    /// Takes a token, or says how long until one is there.
    fn take(&mut self) -> Result<(), Duration> {
        let now = std::time::Instant::now();
        let burst = self.per_second.max(1.0);
        self.tokens = (self.tokens
            + now.duration_since(self.refilled).as_secs_f64() * self.per_second)
            .min(burst);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            self.throttled += 1;
            Err(Duration::from_secs_f64(
                (1.0 - self.tokens) / self.per_second,
            ))
        }
    }
}

impl State {
    /// `Err(wait)` when `account`'s mailbox is over its limit.
    fn over_limit(&mut self, account: &str) -> Result<(), Duration> {
        match self.mailbox_limits.get_mut(account) {
            Some(limit) => limit.take(),
            None => Ok(()),
        }
    }
}

/// The four stand-ins and what they saw.
#[derive(Clone)]
pub struct StandIns {
    pub microsoft_login: Arc<MockServer>,
    pub graph: Arc<MockServer>,
    pub google_oauth: Arc<MockServer>,
    pub gmail: Arc<MockServer>,
    state: Arc<Mutex<State>>,
}

fn bearer(request: &Request) -> Option<String> {
    let h = request.headers.get("authorization")?.to_str().ok()?;
    h.strip_prefix("Bearer ").map(str::to_owned)
}

fn form(request: &Request) -> HashMap<String, String> {
    url::form_urlencoded::parse(&request.body)
        .into_owned()
        .collect()
}

fn graph_error(status: u16, code: &str, message: &str) -> ResponseTemplate {
    let id = uuid::Uuid::new_v4().to_string();
    ResponseTemplate::new(status)
        .insert_header("request-id", id.as_str())
        .insert_header("client-request-id", id.as_str())
        .set_body_json(json!({"error": {"code": code, "message": message,
            "innerError": {"date": chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S").to_string(),
                           "request-id": id, "client-request-id": id}}}))
}

fn google_error(status: u16, reason: &str, message: &str, state: &str) -> ResponseTemplate {
    ResponseTemplate::new(status)
        .set_body_json(json!({"error": {"code": status, "message": message,
        "errors": [{"message": message, "domain": "global", "reason": reason}], "status": state}}))
}

fn microsoft_token_error(aadsts: u32, error: &str, description: &str) -> ResponseTemplate {
    let trace = uuid::Uuid::new_v4().to_string();
    ResponseTemplate::new(400).set_body_json(json!({
        "error": error,
        "error_description": format!("AADSTS{aadsts}: {description}\r\nTrace ID: {trace}\r\nCorrelation ID: {trace}\r\nTimestamp: {}", chrono::Utc::now().format("%Y-%m-%d %H:%M:%SZ")),
        "error_codes": [aadsts],
        "timestamp": chrono::Utc::now().format("%Y-%m-%d %H:%M:%SZ").to_string(),
        "trace_id": trace, "correlation_id": trace,
        "error_uri": format!("https://login.microsoftonline.com/error?code={aadsts}"),
    }))
}

/// Graph 429 as documented for ApplicationThrottled, with `Retry-After` in seconds.
pub fn graph_throttled(retry_after_secs: u64) -> ResponseTemplate {
    graph_error(
        429,
        "ApplicationThrottled",
        "Application is over its MailboxConcurrency limit.",
    )
    .insert_header("Retry-After", retry_after_secs.to_string().as_str())
}

/// Graph 503 serviceNotAvailable.
pub fn graph_unavailable() -> ResponseTemplate {
    graph_error(
        503,
        "serviceNotAvailable",
        "Service unavailable. Please try again later.",
    )
}

/// Graph 403 ErrorSendAsDenied.
pub fn graph_send_as_denied() -> ResponseTemplate {
    graph_error(
        403,
        "ErrorSendAsDenied",
        "The user account which was used to submit this request does not have the right to send mail on behalf of the specified sending account., Cannot submit message.",
    )
}

/// Graph 400 ErrorInvalidRecipients.
pub fn graph_invalid_recipients() -> ResponseTemplate {
    graph_error(
        400,
        "ErrorInvalidRecipients",
        "At least one recipient isn't valid., A message can't be sent because it contains no recipients.",
    )
}

/// Gmail 429 whose message carries the time to retry at.
pub fn gmail_rate_limited(retry_in: Duration) -> ResponseTemplate {
    let at = chrono::Utc::now() + chrono::Duration::from_std(retry_in).unwrap();
    let message = format!(
        "User-rate limit exceeded.  Retry after {}",
        at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    );
    google_error(429, "rateLimitExceeded", &message, "RESOURCE_EXHAUSTED")
}

/// Gmail 503 backendError.
pub fn gmail_unavailable() -> ResponseTemplate {
    google_error(
        503,
        "backendError",
        "The service is currently unavailable.",
        "UNAVAILABLE",
    )
}

/// Gmail 403 dailyLimitExceeded.
pub fn gmail_daily_limit() -> ResponseTemplate {
    google_error(
        403,
        "dailyLimitExceeded",
        "Daily Limit Exceeded",
        "PERMISSION_DENIED",
    )
}

/// The authorization-code grant, checked as the providers check it: a known,
/// unused code, the same client and redirect URI, and a PKCE verifier whose
/// S256 hash is the challenge (RFC 7636 §4.6).
fn exchange_code(
    s: &mut State,
    vendor: Vendor,
    f: &HashMap<String, String>,
) -> Result<IssuedCode, &'static str> {
    let code = f.get("code").ok_or("code missing")?;
    let issued = s.codes.remove(code).ok_or("code unknown or already used")?;
    if issued.vendor != vendor
        || f.get("redirect_uri") != Some(&issued.redirect_uri)
        || f.get("client_id") != Some(&issued.client_id)
    {
        return Err("client or redirect_uri mismatch");
    }
    use sha2::Digest as _;
    let verifier = f.get("code_verifier").ok_or("code_verifier missing")?;
    let hashed = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(sha2::Sha256::digest(verifier.as_bytes()));
    if hashed != issued.challenge {
        return Err("PKCE verification failed");
    }
    Ok(issued)
}

/// An unsigned JWT carrying the OpenID Connect claims we read.
fn id_token(vendor: Vendor, account: &str) -> String {
    let b64 = |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let iss = match vendor {
        Vendor::Microsoft => "https://login.microsoftonline.com/common/v2.0",
        Vendor::Google => "https://accounts.google.com",
    };
    format!(
        "{}.{}.{}",
        b64(json!({"alg": "RS256", "kid": "stand-in", "typ": "JWT"})),
        b64(
            json!({"iss": iss, "sub": format!("sub-{account}"), "email": account, "email_verified": true,
                   "iat": chrono::Utc::now().timestamp(), "exp": chrono::Utc::now().timestamp() + 3600})
        ),
        "c2lnbmF0dXJl"
    )
}

struct MicrosoftToken(Arc<Mutex<State>>);
impl Respond for MicrosoftToken {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let mut s = self.0.lock().unwrap();
        let f = form(request);
        s.token_requests.push((Vendor::Microsoft, f.clone()));
        let delay = s.token_delay;
        if f.get("grant_type").map(String::as_str) == Some("authorization_code") {
            return match exchange_code(&mut s, Vendor::Microsoft, &f) {
                Ok(issued) => {
                    s.counter += 1;
                    let (access, refresh) = (
                        format!("ms-at-{}", s.counter),
                        format!("ms-rt-{}", s.counter),
                    );
                    s.access
                        .insert(access.clone(), (Vendor::Microsoft, issued.account.clone()));
                    s.refresh
                        .insert(refresh.clone(), (Vendor::Microsoft, issued.account.clone()));
                    ResponseTemplate::new(200).set_body_json(json!({
                        "token_type": "Bearer", "scope": issued.scope, "expires_in": 3599, "ext_expires_in": 3599,
                        "access_token": access, "refresh_token": refresh,
                        "id_token": id_token(Vendor::Microsoft, &issued.account),
                    }))
                }
                Err(why) => microsoft_token_error(
                    70000,
                    "invalid_grant",
                    &format!("The provided value for the 'code' parameter is not valid. ({why})"),
                ),
            };
        }
        let grant = f.get("grant_type").map(String::as_str);
        let account = match grant {
            Some("refresh_token") => f
                .get("refresh_token")
                .and_then(|t| s.refresh.get(t))
                .cloned(),
            _ => None,
        };
        let Some((Vendor::Microsoft, account)) = account else {
            return microsoft_token_error(
                9002313,
                "invalid_grant",
                "Invalid request. Request is malformed or invalid.",
            );
        };
        if s.revoked_accounts.contains(&account) {
            return microsoft_token_error(
                70008,
                "invalid_grant",
                "The provided authorization code or refresh token has expired due to inactivity.",
            );
        }
        s.counter += 1;
        let (access, refresh) = (
            format!("ms-at-{}", s.counter),
            format!("ms-rt-{}", s.counter),
        );
        s.access
            .insert(access.clone(), (Vendor::Microsoft, account.clone()));
        s.refresh
            .insert(refresh.clone(), (Vendor::Microsoft, account));
        ResponseTemplate::new(200).set_delay(delay).set_body_json(json!({
            "token_type": "Bearer",
            "scope": "https://graph.microsoft.com/Mail.Send https://graph.microsoft.com/User.Read",
            "expires_in": 3599, "ext_expires_in": 3599,
            "access_token": access, "refresh_token": refresh,
        }))
    }
}

struct GoogleToken(Arc<Mutex<State>>);
impl Respond for GoogleToken {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let mut s = self.0.lock().unwrap();
        let f = form(request);
        s.token_requests.push((Vendor::Google, f.clone()));
        let delay = s.token_delay;
        if f.get("grant_type").map(String::as_str) == Some("authorization_code") {
            return match exchange_code(&mut s, Vendor::Google, &f) {
                Ok(issued) => {
                    s.counter += 1;
                    let (access, refresh) = (
                        format!("ya29.g-at-{}", s.counter),
                        format!("1//g-rt-{}", s.counter),
                    );
                    s.access
                        .insert(access.clone(), (Vendor::Google, issued.account.clone()));
                    s.refresh
                        .insert(refresh.clone(), (Vendor::Google, issued.account.clone()));
                    ResponseTemplate::new(200).set_body_json(json!({
                        "access_token": access, "expires_in": 3599, "refresh_token": refresh,
                        "scope": issued.scope, "token_type": "Bearer", "id_token": id_token(Vendor::Google, &issued.account),
                    }))
                }
                Err(_) => ResponseTemplate::new(400).set_body_json(
                    json!({"error": "invalid_grant", "error_description": "Bad Request"}),
                ),
            };
        }
        let account = f
            .get("refresh_token")
            .and_then(|t| s.refresh.get(t))
            .cloned();
        match account {
            Some((Vendor::Google, account)) if !s.revoked_accounts.contains(&account) => {
                s.counter += 1;
                let access = format!("ya29.g-at-{}", s.counter);
                s.access.insert(access.clone(), (Vendor::Google, account));
                ResponseTemplate::new(200).set_delay(delay).set_body_json(json!({
                    "access_token": access, "expires_in": 3599,
                    "scope": "https://www.googleapis.com/auth/gmail.send", "token_type": "Bearer",
                }))
            }
            _ => ResponseTemplate::new(400)
                .set_body_json(json!({"error": "invalid_grant", "error_description": "Token has been expired or revoked."})),
        }
    }
}

struct GoogleRevoke(Arc<Mutex<State>>);
impl Respond for GoogleRevoke {
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
                if let Some((_, account)) = s.refresh.get(&t).cloned() {
                    s.revoked_accounts.insert(account);
                }
                ResponseTemplate::new(200)
            }
            _ => ResponseTemplate::new(400).set_body_json(
                json!({"error": "invalid_token", "error_description": "Token expired or revoked"}),
            ),
        }
    }
}

/// The consent page: checks the request as the providers do, then redirects the
/// browser back with a code (or `error=access_denied`).
struct Authorize(Arc<Mutex<State>>, Vendor);
impl Respond for Authorize {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let mut s = self.0.lock().unwrap();
        let q: HashMap<String, String> = request.url.query_pairs().into_owned().collect();
        s.authorize_requests.push((self.1, q.clone()));
        let get = |k: &str| q.get(k).map(String::as_str).unwrap_or_default();
        let bad = |why: &str| {
            ResponseTemplate::new(400).set_body_string(format!("invalid_request: {why}"))
        };
        if get("response_type") != "code" {
            return bad("response_type must be code");
        }
        if get("client_id").is_empty() || get("redirect_uri").is_empty() || get("state").is_empty()
        {
            return bad("client_id, redirect_uri and state are required");
        }
        if get("code_challenge_method") != "S256" || get("code_challenge").len() < 43 {
            return bad("PKCE S256 required");
        }
        if self.1 == Vendor::Google
            && (get("access_type") != "offline" || get("prompt") != "consent")
        {
            return bad("access_type=offline and prompt=consent expected");
        }
        let Ok(mut back) = url::Url::parse(get("redirect_uri")) else {
            return bad("redirect_uri");
        };
        match s.consent.get(&self.1).cloned() {
            Some(Consent::Approve(account)) => {
                s.counter += 1;
                let code = format!("code-{}-{}", s.counter, uuid::Uuid::new_v4().simple());
                s.codes.insert(
                    code.clone(),
                    IssuedCode {
                        vendor: self.1,
                        account,
                        challenge: get("code_challenge").to_owned(),
                        redirect_uri: get("redirect_uri").to_owned(),
                        client_id: get("client_id").to_owned(),
                        scope: get("scope").to_owned(),
                    },
                );
                back.query_pairs_mut()
                    .append_pair("code", &code)
                    .append_pair("state", get("state"));
            }
            Some(Consent::Deny) | None => {
                back.query_pairs_mut()
                    .append_pair("error", "access_denied")
                    .append_pair("error_description", "The user has denied access to the scope requested by the client application.")
                    .append_pair("state", get("state"));
            }
        }
        ResponseTemplate::new(302).insert_header("Location", back.as_str())
    }
}

/// Graph `GET /v1.0/me`.
struct GraphMe(Arc<Mutex<State>>);
impl Respond for GraphMe {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let s = self.0.lock().unwrap();
        match bearer(request).and_then(|t| s.access.get(&t).cloned()) {
            Some((Vendor::Microsoft, account)) => ResponseTemplate::new(200).set_body_json(json!({
                "@odata.context": "https://graph.microsoft.com/v1.0/$metadata#users/$entity",
                "businessPhones": [], "displayName": "Connected Admin", "givenName": "Connected", "surname": "Admin",
                "jobTitle": null, "mail": account, "mobilePhone": null, "officeLocation": null,
                "preferredLanguage": "fr-FR", "userPrincipalName": account, "id": uuid::Uuid::new_v4().to_string(),
            })),
            _ => graph_error(401, "InvalidAuthenticationToken", "Access token is empty."),
        }
    }
}

/// Gmail `GET /gmail/v1/users/me/settings/sendAs`.
struct GmailSendAs(Arc<Mutex<State>>);
impl Respond for GmailSendAs {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let s = self.0.lock().unwrap();
        match bearer(request).and_then(|t| s.access.get(&t).cloned()) {
            Some((Vendor::Google, account)) => {
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
            _ => google_error(
                401,
                "authError",
                "Request had invalid authentication credentials.",
                "UNAUTHENTICATED",
            ),
        }
    }
}

struct GraphSend(Arc<Mutex<State>>);
impl Respond for GraphSend {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let mut s = self.0.lock().unwrap();
        *s.send_attempts.entry(Vendor::Microsoft).or_default() += 1;
        s.attempt_times
            .push((Vendor::Microsoft, std::time::Instant::now()));
        let delay = s.send_delay;
        let account = match bearer(request).and_then(|t| s.access.get(&t).cloned()) {
            Some((Vendor::Microsoft, account)) => account,
            _ => {
                return graph_error(
                    401,
                    "InvalidAuthenticationToken",
                    "Access token has expired or is not yet valid.",
                )
                .insert_header(
                    "WWW-Authenticate",
                    "Bearer realm=\"\", error=\"invalid_token\"",
                );
            }
        };
        if let Err(wait) = s.over_limit(&account) {
            // Graph gives Retry-After in whole seconds.
            return graph_throttled(wait.as_secs_f64().ceil().max(1.0) as u64);
        }
        if let Some(scripted) = s
            .scripted
            .get_mut(&Vendor::Microsoft)
            .and_then(VecDeque::pop_front)
        {
            return scripted.set_delay(delay);
        }
        if s.fault_rate > 0.0 && rand::random::<f64>() < s.fault_rate {
            return graph_unavailable().set_delay(delay);
        }
        let Ok(body) = serde_json::from_slice::<Value>(&request.body) else {
            return graph_error(400, "BadRequest", "Unable to read JSON request payload.");
        };
        // Graph refuses an empty internetMessageHeaders array and non-X- names.
        if let Some(h) = body["message"].get("internetMessageHeaders") {
            let ok = h.as_array().is_some_and(|a| {
                !a.is_empty()
                    && a.len() <= 5
                    && a.iter().all(|x| {
                        x["name"]
                            .as_str()
                            .is_some_and(|n| n.to_ascii_lowercase().starts_with("x-"))
                    })
            });
            if !ok {
                return graph_error(
                    400,
                    "InvalidInternetMessageHeader",
                    "The internet message header name 'Subject' should start with 'x-' or 'X-'.",
                );
            }
        }
        let id = uuid::Uuid::new_v4().to_string();
        let address = |v: &Value| {
            v["emailAddress"]["address"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        };
        let m = &body["message"];
        s.received.push(Received {
            provider: "microsoft",
            received_at: chrono::Utc::now(),
            id: id.clone(),
            from: address(&m["from"]),
            to: m["toRecipients"]
                .as_array()
                .map(|a| a.iter().map(address).collect())
                .unwrap_or_default(),
            subject: m["subject"].as_str().unwrap_or_default().to_owned(),
        });
        s.graph_sends.push(body);
        ResponseTemplate::new(202)
            .set_delay(delay)
            .insert_header("request-id", id.as_str())
            .insert_header("client-request-id", id.as_str())
    }
}

struct GmailSend(Arc<Mutex<State>>);
impl Respond for GmailSend {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let mut s = self.0.lock().unwrap();
        *s.send_attempts.entry(Vendor::Google).or_default() += 1;
        s.attempt_times
            .push((Vendor::Google, std::time::Instant::now()));
        let delay = s.send_delay;
        let account = match bearer(request).and_then(|t| s.access.get(&t).cloned()) {
            Some((Vendor::Google, account)) => account,
            _ => {
                return google_error(
                    401,
                    "authError",
                    "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential.",
                    "UNAUTHENTICATED",
                )
                .insert_header("WWW-Authenticate", "Bearer realm=\"https://accounts.google.com/\", error=\"invalid_token\"");
            }
        };
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

impl StandIns {
    /// Four servers on random ports, one per provider host.
    pub async fn start() -> StandIns {
        let (microsoft_login, graph, google_oauth, gmail) = tokio::join!(
            MockServer::start(),
            MockServer::start(),
            MockServer::start(),
            MockServer::start()
        );
        Self::mount(microsoft_login, graph, google_oauth, gmail).await
    }

    /// One server answering for every provider host (their paths do not collide),
    /// on the given listener: the sandbox.
    pub async fn start_on(listener: std::net::TcpListener) -> StandIns {
        let server = MockServer::builder().listener(listener).start().await;
        let server = Arc::new(server);
        let state = Arc::new(Mutex::new(State::default()));
        Self::mount_all(&server, &server, &server, &server, &state).await;
        StandIns {
            microsoft_login: server.clone(),
            graph: server.clone(),
            google_oauth: server.clone(),
            gmail: server,
            state,
        }
    }

    async fn mount(
        microsoft_login: MockServer,
        graph: MockServer,
        google_oauth: MockServer,
        gmail: MockServer,
    ) -> StandIns {
        let state = Arc::new(Mutex::new(State::default()));
        Self::mount_all(&microsoft_login, &graph, &google_oauth, &gmail, &state).await;
        StandIns {
            microsoft_login: Arc::new(microsoft_login),
            graph: Arc::new(graph),
            google_oauth: Arc::new(google_oauth),
            gmail: Arc::new(gmail),
            state,
        }
    }

    async fn mount_all(
        microsoft_login: &MockServer,
        graph: &MockServer,
        google_oauth: &MockServer,
        gmail: &MockServer,
        state: &Arc<Mutex<State>>,
    ) {
        Mock::given(method("POST"))
            .and(path_regex(r"^/[^/]+/oauth2/v2\.0/token$"))
            .respond_with(MicrosoftToken(state.clone()))
            .mount(microsoft_login)
            .await;
        Mock::given(method("GET"))
            .and(path_regex(r"^/[^/]+/oauth2/v2\.0/authorize$"))
            .respond_with(Authorize(state.clone(), Vendor::Microsoft))
            .mount(microsoft_login)
            .await;
        Mock::given(method("GET"))
            .and(path("/o/oauth2/v2/auth"))
            .respond_with(Authorize(state.clone(), Vendor::Google))
            .mount(google_oauth)
            .await;
        Mock::given(method("GET"))
            .and(path("/v1.0/me"))
            .respond_with(GraphMe(state.clone()))
            .mount(graph)
            .await;
        Mock::given(method("GET"))
            .and(path("/gmail/v1/users/me/settings/sendAs"))
            .respond_with(GmailSendAs(state.clone()))
            .mount(gmail)
            .await;
        Mock::given(method("POST"))
            .and(path("/v1.0/me/sendMail"))
            .respond_with(GraphSend(state.clone()))
            .mount(graph)
            .await;
        Mock::given(method("POST"))
            .and(path("/token"))
            .respond_with(GoogleToken(state.clone()))
            .mount(google_oauth)
            .await;
        Mock::given(method("POST"))
            .and(path("/revoke"))
            .respond_with(GoogleRevoke(state.clone()))
            .mount(google_oauth)
            .await;
        Mock::given(method("POST"))
            .and(path("/gmail/v1/users/me/messages/send"))
            .respond_with(GmailSend(state.clone()))
            .mount(gmail)
            .await;
    }

    /// Mints a grant for `account` as the provider's consent would:
    /// (access token, refresh token).
    pub fn issue(&self, vendor: Vendor, account: &str) -> (String, String) {
        let mut s = self.state.lock().unwrap();
        s.counter += 1;
        let n = s.counter;
        let (access, refresh) = match vendor {
            Vendor::Microsoft => (format!("ms-at-{n}"), format!("ms-rt-{n}")),
            Vendor::Google => (format!("ya29.g-at-{n}"), format!("1//g-rt-{n}")),
        };
        s.access
            .insert(access.clone(), (vendor, account.to_owned()));
        s.refresh
            .insert(refresh.clone(), (vendor, account.to_owned()));
        (access, refresh)
    }

    /// How the next consent pages of `vendor` answer.
    pub fn set_consent(&self, vendor: Vendor, consent: Consent) {
        self.state.lock().unwrap().consent.insert(vendor, consent);
    }

    /// Verified send-as aliases of a Google account.
    pub fn set_aliases(&self, account: &str, aliases: &[&str]) {
        self.state.lock().unwrap().aliases.insert(
            account.to_owned(),
            aliases.iter().map(|a| a.to_string()).collect(),
        );
    }

    /// The query strings the consent pages of `vendor` received.
    pub fn authorize_requests(&self, vendor: Vendor) -> Vec<HashMap<String, String>> {
        self.state
            .lock()
            .unwrap()
            .authorize_requests
            .iter()
            .filter(|(v, _)| *v == vendor)
            .map(|(_, q)| q.clone())
            .collect()
    }

    /// Authorization-code grants received by `vendor`'s token endpoint.
    pub fn code_exchanges(&self, vendor: Vendor) -> Vec<HashMap<String, String>> {
        self.state
            .lock()
            .unwrap()
            .token_requests
            .iter()
            .filter(|(v, f)| {
                *v == vendor
                    && f.get("grant_type").map(String::as_str) == Some("authorization_code")
            })
            .map(|(_, f)| f.clone())
            .collect()
    }

    /// The provider stops accepting this access token (it expired or was revoked).
    pub fn invalidate_access(&self, token: &str) {
        self.state.lock().unwrap().access.remove(token);
    }

    /// Every access token of `vendor` stops working (they expired).
    pub fn invalidate_all_access(&self, vendor: Vendor) {
        self.state
            .lock()
            .unwrap()
            .access
            .retain(|_, (v, _)| *v != vendor);
    }

    /// The account's grant is revoked: refreshes get `invalid_grant`, access tokens 401.
    pub fn revoke_account(&self, account: &str) {
        let mut s = self.state.lock().unwrap();
        s.revoked_accounts.insert(account.to_owned());
        s.access.retain(|_, (_, a)| a != account);
    }

    /// Answers the next send attempts to `vendor` with these responses, in order.
    pub fn script(&self, vendor: Vendor, responses: impl IntoIterator<Item = ResponseTemplate>) {
        self.state
            .lock()
            .unwrap()
            .scripted
            .entry(vendor)
            .or_default()
            .extend(responses);
    }

    /// Every accepted message, oldest first.
    pub fn received(&self) -> Vec<Received> {
        self.state.lock().unwrap().received.clone()
    }

    /// A share (0 to 1) of sends answer 503 (fault injection).
    pub fn set_fault_rate(&self, rate: f64) {
        self.state.lock().unwrap().fault_rate = rate.clamp(0.0, 1.0);
    }

    /// Delays every send answer (a slow provider).
    /// Limits sends from `account`'s mailbox to `per_second` (a token bucket with
    /// one second of burst); over it, Graph answers 429 `ApplicationThrottled`
    /// with `Retry-After` and Gmail 429 `rateLimitExceeded` with the time to
    /// retry at, as the providers document. `None` lifts the limit.
    pub fn set_mailbox_limit(&self, account: &str, per_second: Option<f64>) {
        let mut s = self.state.lock().unwrap();
        match per_second {
            Some(rate) if rate > 0.0 => {
                s.mailbox_limits.insert(
                    account.to_owned(),
                    MailboxLimit {
                        per_second: rate,
                        tokens: rate.max(1.0),
                        refilled: std::time::Instant::now(),
                        throttled: 0,
                    },
                );
            }
            _ => {
                s.mailbox_limits.remove(account);
            }
        }
    }

    /// How many sends from `account`'s mailbox were refused by its limit.
    pub fn throttled(&self, account: &str) -> u64 {
        let s = self.state.lock().unwrap();
        s.mailbox_limits.get(account).map_or(0, |l| l.throttled)
    }

    pub fn set_send_delay(&self, d: Duration) {
        self.state.lock().unwrap().send_delay = d;
    }

    /// Delays every token answer.
    pub fn set_token_delay(&self, d: Duration) {
        self.state.lock().unwrap().token_delay = d;
    }

    /// Refresh-token grants received by `vendor`'s token endpoint.
    pub fn refreshes(&self, vendor: Vendor) -> Vec<HashMap<String, String>> {
        self.state
            .lock()
            .unwrap()
            .token_requests
            .iter()
            .filter(|(v, f)| {
                *v == vendor && f.get("grant_type").map(String::as_str) == Some("refresh_token")
            })
            .map(|(_, f)| f.clone())
            .collect()
    }

    /// Send requests that reached `vendor`, whatever the answer.
    pub fn send_attempts(&self, vendor: Vendor) -> u32 {
        self.state
            .lock()
            .unwrap()
            .send_attempts
            .get(&vendor)
            .copied()
            .unwrap_or(0)
    }

    /// When each send request to `vendor` arrived.
    pub fn attempt_times(&self, vendor: Vendor) -> Vec<std::time::Instant> {
        self.state
            .lock()
            .unwrap()
            .attempt_times
            .iter()
            .filter(|(v, _)| *v == vendor)
            .map(|(_, t)| *t)
            .collect()
    }

    /// Stops answering with scripted failures.
    pub fn clear_script(&self) {
        self.state.lock().unwrap().scripted.clear();
    }

    /// `sendMail` bodies Graph accepted.
    pub fn graph_messages(&self) -> Vec<Value> {
        self.state.lock().unwrap().graph_sends.clone()
    }

    /// Raw RFC 5322 messages Gmail accepted.
    pub fn gmail_messages(&self) -> Vec<Vec<u8>> {
        self.state.lock().unwrap().gmail_sends.clone()
    }

    /// Tokens revoked at Google's revoke endpoint.
    pub fn revocations(&self) -> Vec<String> {
        self.state.lock().unwrap().revocations.clone()
    }

    /// Whether the stand-in currently accepts this access token.
    pub fn accepts(&self, token: &str) -> bool {
        self.state.lock().unwrap().access.contains_key(token)
    }
}
