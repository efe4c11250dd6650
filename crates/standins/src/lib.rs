//! Local stand-ins of Microsoft and Google, answering as the official docs show
//! and refusing what the real providers refuse (issue #10 §1: "a stand-in must
//! refuse what the real provider refuses; each refusal has a test" — the tests
//! are in `tests/e2e/standins.rs`).
//!
//! - Microsoft identity platform (`microsoft.rs`): authorize, admin consent and
//!   token endpoints (learn.microsoft.com/en-us/entra/identity-platform/v2-oauth2-auth-code-flow):
//!   token success `{"token_type":"Bearer","scope","expires_in","ext_expires_in","access_token","refresh_token","id_token"}`
//!   — a new refresh token on every refresh that asks for `offline_access`; errors
//!   `{"error","error_description","error_codes","timestamp","trace_id","correlation_id","error_uri"}`.
//! - Microsoft Graph (`microsoft.rs`): `GET /v1.0/me` and `POST /v1.0/me/sendMail`
//!   (learn.microsoft.com/en-us/graph/api/user-sendmail): `202 Accepted`, empty
//!   body, `request-id` and `client-request-id` headers; errors
//!   `{"error":{"code","message","innerError":{"date","request-id","client-request-id"}}}`.
//!   Drafts, attachment upload sessions and `send` for messages over 4 MB
//!   (`microsoft_drafts.rs`, learn.microsoft.com/graph/outlook-large-attachments).
//! - Google OAuth (`google.rs`): authorize, token and revoke endpoints
//!   (developers.google.com/identity/protocols/oauth2/web-server): success
//!   `{"access_token","expires_in","scope","token_type"}` (no new refresh token on
//!   refresh); error `{"error":"invalid_grant","error_description":"Token has been expired or revoked."}`.
//! - Gmail (`google.rs`): `POST /gmail/v1/users/me/messages/send`
//!   (developers.google.com/gmail/api/reference/rest/v1/users.messages/send): `200`
//!   with a Message `{"id","threadId","labelIds":["SENT"]}`, and
//!   `GET /gmail/v1/users/me/settings/sendAs`; errors
//!   `{"error":{"code","message","errors":[{"message","domain","reason"}],"status"}}`.
//! - Canned faults (`faults.rs`): throttling, outages and refusals to script.
//!
//! Access tokens carry the scopes of their grant: Graph and Gmail refuse a call
//! the token's scopes do not allow, as the real services do.

mod faults;
mod google;
mod microsoft;
mod microsoft_drafts;
mod quota;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use serde_json::Value;
use wiremock::matchers::{method, path, path_regex};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use faults::{GRAPH_MAILBOX_CONCURRENCY, MailboxConcurrency, MailboxLimit};
pub use faults::{
    gmail_daily_limit, gmail_rate_limited, gmail_unavailable, graph_invalid_recipients,
    graph_send_as_denied, graph_throttled, graph_unavailable,
};
pub use quota::SendingQuota;

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
    /// Google's granular consent: the user signs in as `account` and approves,
    /// but unticks these scopes (`openid`, `email` and `profile` cannot be
    /// unticked). The grant is what was requested minus `unticked`, and the
    /// token response's `scope` says so
    /// (https://developers.google.com/identity/protocols/oauth2/resources/granular-permissions).
    /// Microsoft has no granular consent: there this is `Approve(account)`.
    Partial {
        account: String,
        unticked: Vec<String>,
    },
}

/// What the providers' directories say about an account.
#[derive(Clone, Debug)]
pub struct AccountInfo {
    /// Microsoft `oid` (Graph `id`) or Google `sub`.
    pub id: String,
    /// Microsoft `tid`.
    pub tenant_id: String,
    pub display_name: String,
    /// Microsoft `mail`; `None` is `"mail": null` (no Exchange mailbox).
    pub mail: Option<String>,
    /// A Microsoft consumer account (tid `9188040d-6c67-4c5b-b112-36a304b66dad`).
    pub personal: bool,
    /// Google `hd` (Workspace domain); `None` for consumer accounts.
    pub hosted_domain: Option<String>,
    /// Exchange proxy addresses (`SMTP:` primary, `smtp:` aliases).
    pub proxy_addresses: Vec<String>,
}

impl AccountInfo {
    /// The directory entry a provider would hold for `address` when nothing was
    /// set: stable ids derived from the address and its domain.
    fn derived(address: &str) -> AccountInfo {
        let address = address.trim();
        let (local, domain) = address.rsplit_once('@').unwrap_or((address, ""));
        let domain = domain.to_ascii_lowercase();
        let mut name: Vec<char> = local.chars().collect();
        if let Some(first) = name.first_mut() {
            *first = first.to_ascii_uppercase();
        }
        AccountInfo {
            id: uuid_from(&format!("account:{}", address.to_ascii_lowercase())),
            tenant_id: uuid_from(&format!("tenant:{domain}")),
            display_name: format!("{} ({domain})", name.into_iter().collect::<String>()),
            mail: Some(address.to_owned()),
            personal: false,
            hosted_domain: match domain.as_str() {
                "gmail.com" | "googlemail.com" | "" => None,
                d => Some(d.to_owned()),
            },
            proxy_addresses: vec![format!("SMTP:{address}")],
        }
    }

    /// The `tid` Entra puts in tokens: consumer accounts all share one.
    fn effective_tenant(&self) -> &str {
        if self.personal {
            microsoft::CONSUMERS_TENANT
        } else {
            &self.tenant_id
        }
    }
}

/// A UUID-shaped (version 5 layout) identifier derived from `seed`.
fn uuid_from(seed: &str) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(seed.as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    bytes[6] = (bytes[6] & 0x0f) | 0x50;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    uuid::Uuid::from_bytes(bytes).to_string()
}

/// The lower-cased domain of an address.
fn domain_of(address: &str) -> String {
    address
        .rsplit_once('@')
        .map(|(_, d)| d.to_ascii_lowercase())
        .unwrap_or_default()
}

/// What an access or refresh token stands for.
#[derive(Clone, Debug)]
struct Grant {
    vendor: Vendor,
    account: String,
    /// Normalized scopes (full Graph / Google URLs, OIDC scopes bare).
    scopes: Vec<String>,
}

/// An authorization code issued by a consent page, waiting for its exchange.
#[derive(Clone, Debug)]
struct IssuedCode {
    vendor: Vendor,
    account: String,
    challenge: String,
    redirect_uri: String,
    client_id: String,
    /// What the user granted, normalized.
    scopes: Vec<String>,
}

/// A message a stand-in accepted, summarized for people (the sandbox's pages),
/// with what its recipients see: the provider's rewriting of the From applied.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Received {
    pub provider: &'static str,
    pub received_at: chrono::DateTime<chrono::Utc>,
    pub id: String,
    /// The From address the request asked for.
    pub from: String,
    pub to: Vec<String>,
    pub subject: String,
    /// The From recipients see, after the provider's rewriting (Exchange: the
    /// directory's display name, an alias turned into the primary address).
    pub seen_from: SeenMailbox,
    /// The mailbox that really sent, when it is not the From ("X on behalf of
    /// Y": the RFC 5322 `Sender`, shown by Outlook as "Sender on behalf of From").
    pub seen_sender: Option<SeenMailbox>,
    /// The `Message-ID` header recipients get, with its angle brackets: the one
    /// the request carried, or one the provider made up.
    pub message_id: String,
}

impl Received {
    /// The From line as a mail client shows it: `Name <address>`, or
    /// `Sender on behalf of Name <address>`.
    pub fn shown(&self) -> String {
        match &self.seen_sender {
            Some(sender) => format!(
                "{} on behalf of {}",
                sender.name.as_deref().unwrap_or(&sender.address),
                self.seen_from
            ),
            None => self.seen_from.to_string(),
        }
    }
}

/// A name and address as a recipient's mail client shows them.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SeenMailbox {
    pub name: Option<String>,
    pub address: String,
}

impl std::fmt::Display for SeenMailbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.name {
            Some(name) => write!(f, "{name} <{}>", self.address),
            None => f.write_str(&self.address),
        }
    }
}

#[derive(Default)]
struct State {
    received: Vec<Received>,
    /// Probability that a send answers 503 (fault injection).
    fault_rate: f64,
    consent: HashMap<Vendor, Consent>,
    codes: HashMap<String, IssuedCode>,
    authorize_requests: Vec<(Vendor, HashMap<String, String>)>,
    admin_consent_requests: Vec<HashMap<String, String>>,
    aliases: HashMap<String, Vec<String>>,
    counter: u64,
    access: HashMap<String, Grant>,
    refresh: HashMap<String, Grant>,
    /// Directory entries set by tests (lower-cased address → entry).
    accounts: HashMap<String, AccountInfo>,
    /// Send As rights: account → mailboxes (lower-cased).
    send_as: HashMap<String, HashSet<String>>,
    /// Send on Behalf rights: account → mailboxes (lower-cased).
    send_on_behalf: HashMap<String, HashSet<String>>,
    /// Microsoft tenants (e-mail domains) with `SendFromAliasEnabled`.
    alias_sending: HashSet<String>,
    /// Graph calls as received: (path, `client-request-id` header).
    graph_calls: Vec<(String, Option<String>)>,
    /// Tenants (e-mail domains) whose users cannot consent to apps.
    consent_blocked: HashSet<String>,
    /// Admin consents: (tenant id or domain, client id) → consented scopes.
    admin_consents: HashMap<(String, String), Vec<String>>,
    /// Accounts whose refreshes fail, with the AADSTS code to answer.
    refresh_failures: HashMap<String, u32>,
    revoked_accounts: HashSet<String>,
    token_requests: Vec<(Vendor, HashMap<String, String>)>,
    revocations: Vec<String>,
    graph_sends: Vec<Value>,
    /// Graph drafts by message id.
    graph_drafts: HashMap<String, microsoft_drafts::Draft>,
    /// Graph attachment upload sessions by the token in their URL.
    graph_upload_sessions: HashMap<String, microsoft_drafts::UploadSession>,
    /// Ids of the drafts deleted with `DELETE /v1.0/me/messages/{id}`.
    graph_deleted_drafts: Vec<String>,
    /// Answers to the next `PUT`s on upload URLs, before any check.
    graph_upload_script: VecDeque<ResponseTemplate>,
    /// Upload session lifetime without a fragment (default 15 minutes).
    graph_upload_ttl: Option<Duration>,
    /// The tenant's maximum message size (default Exchange Online's 35 MB).
    graph_max_message_bytes: Option<usize>,
    gmail_sends: Vec<Vec<u8>>,
    /// Gmail resumable upload sessions by `upload_id`.
    gmail_uploads: HashMap<String, google::UploadSession>,
    send_attempts: HashMap<Vendor, u32>,
    attempt_times: Vec<(Vendor, std::time::Instant)>,
    scripted: HashMap<Vendor, VecDeque<ResponseTemplate>>,
    send_delay: Duration,
    token_delay: Duration,
    /// Per-mailbox send limits (account → bucket), as a provider enforces them.
    mailbox_limits: HashMap<String, MailboxLimit>,
    /// Graph requests in flight per mailbox (account), against `graph_concurrency`.
    graph_in_flight: HashMap<String, MailboxConcurrency>,
    /// Graph's concurrent requests per app and mailbox (4 unless a test changes it).
    graph_concurrency: Option<usize>,
    /// Vendors whose consent page waits for a click (`show_consent_page`).
    consent_pages: HashSet<Vendor>,
    /// Sending limits over a rolling window, per account (lower-cased).
    sending_quotas: HashMap<String, quota::QuotaState>,
    /// Graph messages accepted (202) that Exchange bounced for the recipient
    /// rate limit instead of delivering.
    bounced: Vec<Received>,
    /// Until then the Google project's per-minute quota is used up: every
    /// Gmail send, whatever its account, is refused.
    gmail_project_exhausted_until: Option<std::time::Instant>,
    /// Gmail sends refused for the project's quota, per account.
    gmail_project_throttled: HashMap<String, u64>,
    /// Accounts Exchange blocks from sending (Restricted entities).
    graph_blocked: HashSet<String>,
}

impl State {
    /// `Err(wait)` when `account`'s mailbox is over its limit.
    fn over_limit(&mut self, account: &str) -> Result<(), Duration> {
        match self.mailbox_limits.get_mut(account) {
            Some(limit) => limit.take(),
            None => Ok(()),
        }
    }

    /// Takes one of the mailbox's concurrent Graph requests for `busy` (how long
    /// the answer takes); `Err` when all are in flight (the request is refused).
    fn enter_graph(&mut self, account: &str, busy: Duration) -> Result<(), ()> {
        let limit = self.graph_concurrency.unwrap_or(GRAPH_MAILBOX_CONCURRENCY);
        self.graph_in_flight
            .entry(account.to_ascii_lowercase())
            .or_insert_with(MailboxConcurrency::new)
            .enter(limit, busy)
    }

    fn account_info(&self, account: &str) -> AccountInfo {
        self.accounts
            .get(&account.to_ascii_lowercase())
            .cloned()
            .unwrap_or_else(|| AccountInfo::derived(account))
    }

    /// The grant behind the request's bearer token, if it is one of `vendor`'s.
    fn bearer_grant(&self, request: &Request, vendor: Vendor) -> Option<Grant> {
        bearer(request)
            .and_then(|t| self.access.get(&t).cloned())
            .filter(|g| g.vendor == vendor)
    }

    fn next(&mut self) -> u64 {
        self.counter += 1;
        self.counter
    }

    /// A new access token for this grant.
    fn mint_access(&mut self, grant: Grant) -> String {
        let n = self.next();
        let token = match grant.vendor {
            Vendor::Microsoft => format!("ms-at-{n}"),
            Vendor::Google => format!("ya29.g-at-{n}"),
        };
        self.access.insert(token.clone(), grant);
        token
    }

    /// A new refresh token for this grant.
    fn mint_refresh(&mut self, grant: Grant) -> String {
        let n = self.next();
        let token = match grant.vendor {
            Vendor::Microsoft => format!("ms-rt-{n}"),
            Vendor::Google => format!("1//g-rt-{n}"),
        };
        self.refresh.insert(token.clone(), grant);
        token
    }

    /// Records an authorization code for a consent.
    fn issue_code(
        &mut self,
        vendor: Vendor,
        account: String,
        q: &HashMap<String, String>,
        scopes: Vec<String>,
    ) -> String {
        let n = self.next();
        let code = format!("code-{n}-{}", uuid::Uuid::new_v4().simple());
        let get = |k: &str| q.get(k).cloned().unwrap_or_default();
        self.codes.insert(
            code.clone(),
            IssuedCode {
                vendor,
                account,
                challenge: get("code_challenge"),
                redirect_uri: get("redirect_uri"),
                client_id: get("client_id"),
                scopes,
            },
        );
        code
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

fn query(request: &Request) -> HashMap<String, String> {
    request.url.query_pairs().into_owned().collect()
}

/// Scopes as the provider reads them: normalized, in order, without duplicates.
fn normalize_scopes(vendor: Vendor, raw: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for s in raw.split_whitespace() {
        let s = match vendor {
            Vendor::Microsoft => microsoft::normalize_scope(s),
            Vendor::Google => google::normalize_scope(s),
        };
        if !has_scope(&out, &s) {
            out.push(s);
        }
    }
    out
}

/// Whether `scopes` (normalized) hold `wanted` (normalized); scope names are
/// compared without regard to case, as Entra does.
fn has_scope(scopes: &[String], wanted: &str) -> bool {
    scopes.iter().any(|s| s.eq_ignore_ascii_case(wanted))
}

/// An unsigned JWT (`alg` RS256, signature placeholder) carrying `claims`.
fn unsigned_jwt(claims: &Value) -> String {
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    format!(
        "{}.{}.{}",
        b64(&serde_json::json!({"alg": "RS256", "kid": "stand-in", "typ": "JWT"})),
        b64(claims),
        "c2lnbmF0dXJl"
    )
}

/// A 302 back to the client's redirect URI with these query parameters.
fn redirect_back(mut back: url::Url, pairs: &[(&str, &str)]) -> ResponseTemplate {
    {
        let mut q = back.query_pairs_mut();
        for (k, v) in pairs {
            q.append_pair(k, v);
        }
    }
    ResponseTemplate::new(302).insert_header("Location", back.as_str())
}

/// An error page shown in the browser (no redirect back to the client).
fn error_page(status: u16, message: &str) -> ResponseTemplate {
    let html = format!(
        "<!DOCTYPE html><html><head><title>Sign in to your account</title></head><body>\
         <h1>Sorry, but we’re having trouble signing you in.</h1>\
         <p>Request Id: {}</p><p>Timestamp: {}</p><p>Message: {}</p></body></html>",
        uuid::Uuid::new_v4(),
        chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ"),
        html_escape(message)
    );
    ResponseTemplate::new(status).set_body_raw(html, "text/html; charset=utf-8")
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&#39;")
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

/// The consent page: checks the request as the providers do, then lets the
/// provider's rules decide (a code, `error=access_denied`, or an error page).
struct Authorize(Arc<Mutex<State>>, Vendor);
impl Respond for Authorize {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let mut s = self.0.lock().unwrap();
        let q = query(request);
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
        let Ok(back) = url::Url::parse(get("redirect_uri")) else {
            return bad("redirect_uri");
        };
        // A consent page the user clicks through: the request's checks above
        // come first, as at the provider; "Accept" comes back to this same URL.
        if s.consent_pages.contains(&self.1) && get(CONSENT_CLICKED).is_empty() {
            return consent_page(&request.url, self.1, s.consent.get(&self.1));
        }
        let consent = s.consent.get(&self.1).cloned();
        match self.1 {
            Vendor::Microsoft => {
                let tenant = request
                    .url
                    .path_segments()
                    .and_then(|mut p| p.next())
                    .unwrap_or_default()
                    .to_owned();
                microsoft::authorize(&mut s, &q, &tenant, back, consent)
            }
            Vendor::Google => google::authorize(&mut s, &q, back, consent),
        }
    }
}

/// The query parameter the stand-in's consent page adds when "Accept" is clicked.
const CONSENT_CLICKED: &str = "sandbox_consent";

/// A consent page with an "Accept" link (the browser's click is the consent).
fn consent_page(url: &url::Url, vendor: Vendor, consent: Option<&Consent>) -> ResponseTemplate {
    // Relative: the mock server's request URL does not carry its real address.
    let mut accept = url.clone();
    accept.query_pairs_mut().append_pair(CONSENT_CLICKED, "1");
    let accept = format!("{}?{}", accept.path(), accept.query().unwrap_or_default());
    let account = match consent {
        Some(Consent::Approve(a)) | Some(Consent::Partial { account: a, .. }) => a.as_str(),
        _ => "",
    };
    let provider = match vendor {
        Vendor::Microsoft => "Microsoft",
        Vendor::Google => "Google",
    };
    let html = format!(
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{provider} — permissions requested</title></head>\
         <body><h1>{provider} sandbox: permissions requested</h1><p>Signed in as <b id=\"account\">{}</b>. \
         The application asks to send mail as you.</p>\
         <p><a id=\"accept\" href=\"{}\">Accept</a></p></body></html>",
        html_escape(account),
        html_escape(&accept),
    );
    ResponseTemplate::new(200).set_body_raw(html, "text/html; charset=utf-8")
}

/// The answer to a refused consent: `error=access_denied` back to the client.
fn consent_denied(back: url::Url, state: &str) -> ResponseTemplate {
    redirect_back(
        back,
        &[
            ("error", "access_denied"),
            (
                "error_description",
                "The user has denied access to the scope requested by the client application.",
            ),
            ("state", state),
        ],
    )
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
            .respond_with(microsoft::Token(state.clone()))
            .mount(microsoft_login)
            .await;
        Mock::given(method("GET"))
            .and(path_regex(r"^/[^/]+/oauth2/v2\.0/authorize$"))
            .respond_with(Authorize(state.clone(), Vendor::Microsoft))
            .mount(microsoft_login)
            .await;
        Mock::given(method("GET"))
            .and(path_regex(r"^/[^/]+/v2\.0/adminconsent$"))
            .respond_with(microsoft::AdminConsent(state.clone()))
            .mount(microsoft_login)
            .await;
        Mock::given(method("GET"))
            .and(path("/o/oauth2/v2/auth"))
            .respond_with(Authorize(state.clone(), Vendor::Google))
            .mount(google_oauth)
            .await;
        Mock::given(method("GET"))
            .and(path("/v1.0/me"))
            .respond_with(microsoft::GraphMe(state.clone()))
            .mount(graph)
            .await;
        Mock::given(method("GET"))
            .and(path("/gmail/v1/users/me/settings/sendAs"))
            .respond_with(google::GmailSendAs(state.clone()))
            .mount(gmail)
            .await;
        Mock::given(method("POST"))
            .and(path("/v1.0/me/sendMail"))
            .respond_with(microsoft::GraphSend(state.clone()))
            .mount(graph)
            .await;
        Mock::given(method("POST"))
            .and(path_regex(
                r"^/v1\.0/me/messages(/[^/]+(/send|/attachments(/createUploadSession)?)?)?$",
            ))
            .respond_with(microsoft_drafts::GraphDrafts(state.clone()))
            .mount(graph)
            .await;
        Mock::given(method("DELETE"))
            .and(path_regex(r"^/v1\.0/me/messages/[^/]+$"))
            .respond_with(microsoft_drafts::GraphDrafts(state.clone()))
            .mount(graph)
            .await;
        Mock::given(method("PUT"))
            .and(path_regex(r"^/upload/outlook/[^/]+$"))
            .respond_with(microsoft_drafts::GraphUpload(state.clone()))
            .mount(graph)
            .await;
        Mock::given(method("POST"))
            .and(path("/token"))
            .respond_with(google::Token(state.clone()))
            .mount(google_oauth)
            .await;
        Mock::given(method("POST"))
            .and(path("/revoke"))
            .respond_with(google::Revoke(state.clone()))
            .mount(google_oauth)
            .await;
        Mock::given(method("POST"))
            .and(path("/gmail/v1/users/me/messages/send"))
            .respond_with(google::GmailSend(state.clone()))
            .mount(gmail)
            .await;
        Mock::given(method("POST"))
            .and(path("/upload/gmail/v1/users/me/messages/send"))
            .respond_with(google::GmailUploadStart(state.clone()))
            .mount(gmail)
            .await;
        Mock::given(method("PUT"))
            .and(path("/upload/gmail/v1/users/me/messages/send"))
            .respond_with(google::GmailUploadChunk(state.clone()))
            .mount(gmail)
            .await;
    }

    /// Mints a grant for `account` as the provider's consent would:
    /// (access token, refresh token), with the product's default scopes —
    /// Microsoft `openid email profile offline_access User.Read Mail.Send`,
    /// Google `openid email gmail.send`.
    pub fn issue(&self, vendor: Vendor, account: &str) -> (String, String) {
        let scopes: &[&str] = match vendor {
            Vendor::Microsoft => microsoft::DEFAULT_SCOPES,
            Vendor::Google => google::DEFAULT_SCOPES,
        };
        self.issue_with_scopes(vendor, account, scopes)
    }

    /// Mints a grant for `account` carrying exactly these scopes (Microsoft
    /// scopes with or without the `https://graph.microsoft.com/` prefix).
    pub fn issue_with_scopes(
        &self,
        vendor: Vendor,
        account: &str,
        scopes: &[&str],
    ) -> (String, String) {
        let grant = Grant {
            vendor,
            account: account.to_owned(),
            scopes: normalize_scopes(vendor, &scopes.join(" ")),
        };
        let mut s = self.state.lock().unwrap();
        let access = s.mint_access(grant.clone());
        let refresh = s.mint_refresh(grant);
        (access, refresh)
    }

    /// The (normalized) scopes an access token carries, if the stand-in knows it.
    pub fn granted_scopes(&self, access_token: &str) -> Option<Vec<String>> {
        self.state
            .lock()
            .unwrap()
            .access
            .get(access_token)
            .map(|g| g.scopes.clone())
    }

    /// The directory entry of `account`: the one set with [`StandIns::set_account`],
    /// else one derived from the address (stable ids, `mail` = the address,
    /// `hd` = its domain unless gmail.com).
    pub fn account_info(&self, account: &str) -> AccountInfo {
        self.state.lock().unwrap().account_info(account)
    }

    /// Sets the directory entry of `account` (Graph `/me`, ID token claims, sign-in rules).
    pub fn set_account(&self, account: &str, info: AccountInfo) {
        self.state
            .lock()
            .unwrap()
            .accounts
            .insert(account.to_ascii_lowercase(), info);
    }

    /// Gives `account` the Exchange Send As right on `mailbox`.
    pub fn grant_send_as(&self, account: &str, mailbox: &str) {
        self.state
            .lock()
            .unwrap()
            .send_as
            .entry(account.to_ascii_lowercase())
            .or_default()
            .insert(mailbox.to_ascii_lowercase());
    }

    /// Gives `account` the Exchange Send on Behalf right on `mailbox`: Graph
    /// accepts a From of that mailbox (with `Mail.Send.Shared`), and recipients
    /// see "account on behalf of mailbox"
    /// (https://learn.microsoft.com/graph/outlook-send-mail-from-other-user).
    pub fn grant_send_on_behalf(&self, account: &str, mailbox: &str) {
        self.state
            .lock()
            .unwrap()
            .send_on_behalf
            .entry(account.to_ascii_lowercase())
            .or_default()
            .insert(mailbox.to_ascii_lowercase());
    }

    /// The Microsoft tenant of this e-mail domain turns `SendFromAliasEnabled` on
    /// (`true`) or off (`false`, Exchange Online's default): while it is off,
    /// Exchange rewrites a From that is one of the mailbox's proxy-address aliases
    /// to its primary address (Set-OrganizationConfig, `-SendFromAliasEnabled`).
    pub fn allow_send_from_aliases(&self, tenant_domain: &str, allowed: bool) {
        let domain = tenant_domain.trim().to_ascii_lowercase();
        let mut s = self.state.lock().unwrap();
        if allowed {
            s.alias_sending.insert(domain);
        } else {
            s.alias_sending.remove(&domain);
        }
    }

    /// The `client-request-id` header of each Graph call, in order, with the
    /// call's path (`None`: the call had none).
    pub fn graph_client_request_ids(&self) -> Vec<(String, Option<String>)> {
        self.state.lock().unwrap().graph_calls.clone()
    }

    /// The Microsoft tenant of this e-mail domain (e.g. `customer.com`) does not
    /// let users consent to apps: only an admin consent lets its users connect.
    pub fn block_user_consent(&self, tenant_domain: &str) {
        self.state
            .lock()
            .unwrap()
            .consent_blocked
            .insert(tenant_domain.trim().to_ascii_lowercase());
    }

    /// The query strings Microsoft's admin consent endpoint received.
    pub fn admin_consent_requests(&self) -> Vec<HashMap<String, String>> {
        self.state.lock().unwrap().admin_consent_requests.clone()
    }

    /// Subsequent refreshes for `account` fail: Microsoft answers Entra's error
    /// for this AADSTS code (its `error` value and HTTP status), Google answers
    /// `invalid_grant` whatever the code. `None` lets refreshes succeed again.
    pub fn fail_refresh(&self, account: &str, aadsts: Option<u32>) {
        let mut s = self.state.lock().unwrap();
        match aadsts {
            Some(code) => {
                s.refresh_failures.insert(account.to_owned(), code);
            }
            None => {
                s.refresh_failures.remove(account);
            }
        }
    }

    /// Whether the consent page of `vendor` waits for the browser to click
    /// "Accept" (a page with a link) rather than answering at once. The answer
    /// after the click is the one `set_consent` chose.
    pub fn show_consent_page(&self, vendor: Vendor, show: bool) {
        let mut s = self.state.lock().unwrap();
        if show {
            s.consent_pages.insert(vendor);
        } else {
            s.consent_pages.remove(&vendor);
        }
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
        self.token_requests(vendor, "authorization_code")
    }

    /// Refresh-token grants received by `vendor`'s token endpoint.
    pub fn refreshes(&self, vendor: Vendor) -> Vec<HashMap<String, String>> {
        self.token_requests(vendor, "refresh_token")
    }

    fn token_requests(&self, vendor: Vendor, grant_type: &str) -> Vec<HashMap<String, String>> {
        self.state
            .lock()
            .unwrap()
            .token_requests
            .iter()
            .filter(|(v, f)| {
                *v == vendor && f.get("grant_type").map(String::as_str) == Some(grant_type)
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
            .retain(|_, g| g.vendor != vendor);
    }

    /// The account's grant is revoked: refreshes get `invalid_grant`, access tokens 401.
    pub fn revoke_account(&self, account: &str) {
        let mut s = self.state.lock().unwrap();
        s.revoked_accounts.insert(account.to_owned());
        s.access.retain(|_, g| g.account != account);
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

    /// Limits sends from `account`'s mailbox to `per_second` (a token bucket with
    /// one second of burst); over it, Graph answers 429 `ApplicationThrottled`
    /// with `Retry-After` and Gmail 429 `rateLimitExceeded` with the time to
    /// retry at, as the providers document. `None` lifts the limit.
    pub fn set_mailbox_limit(&self, account: &str, per_second: Option<f64>) {
        let mut s = self.state.lock().unwrap();
        match per_second {
            Some(rate) if rate > 0.0 => {
                s.mailbox_limits
                    .insert(account.to_owned(), MailboxLimit::new(rate));
            }
            _ => {
                s.mailbox_limits.remove(account);
            }
        }
    }

    /// Enforces `quota` (the provider's sending limits over a rolling window) on
    /// `account`'s sends; `None` lifts it. Gmail answers a send over it 429
    /// "User-rate limit exceeded … (Mail sending)" and then refuses the user's
    /// sends for a whole window; Exchange accepts it (202) and bounces it
    /// ([`StandIns::bounced`]). See the `quota` module for the sources.
    pub fn set_sending_quota(&self, account: &str, quota: Option<SendingQuota>) {
        let mut s = self.state.lock().unwrap();
        let key = account.to_ascii_lowercase();
        match quota {
            Some(q) => {
                s.sending_quotas.insert(key, quota::QuotaState::new(q));
            }
            None => {
                s.sending_quotas.remove(&key);
            }
        }
    }

    /// How many sends of `account` its sending quota refused (Gmail) or bounced
    /// (Exchange).
    pub fn quota_refusals(&self, account: &str) -> u64 {
        let s = self.state.lock().unwrap();
        s.sending_quotas
            .get(&account.to_ascii_lowercase())
            .map_or(0, |q| q.refused)
    }

    /// Graph messages accepted but bounced by Exchange's recipient rate limit.
    pub fn bounced(&self) -> Vec<Received> {
        self.state.lock().unwrap().bounced.clone()
    }

    /// How many sends from `account`'s mailbox were refused by its limit.
    pub fn throttled(&self, account: &str) -> u64 {
        let s = self.state.lock().unwrap();
        s.mailbox_limits.get(account).map_or(0, |l| l.throttled)
    }

    /// How many Graph requests for `account`'s mailbox were refused (429
    /// `ApplicationThrottled`) for being over Graph's concurrent-request limit.
    pub fn concurrency_throttled(&self, account: &str) -> u64 {
        let s = self.state.lock().unwrap();
        s.graph_in_flight
            .get(&account.to_ascii_lowercase())
            .map_or(0, |c| c.throttled)
    }

    /// The most Graph requests `account`'s mailbox had in flight at once.
    pub fn peak_concurrency(&self, account: &str) -> usize {
        let s = self.state.lock().unwrap();
        s.graph_in_flight
            .get(&account.to_ascii_lowercase())
            .map_or(0, |c| c.peak)
    }

    /// How busy `account`'s mailbox was kept: requests accepted, and their
    /// mean concurrency from the first one's start to the last one's answer
    /// (Graph allows 4).
    pub fn mean_concurrency(&self, account: &str) -> (u64, f64) {
        let s = self.state.lock().unwrap();
        let Some(c) = s.graph_in_flight.get(&account.to_ascii_lowercase()) else {
            return (0, 0.0);
        };
        let span = match (c.first, c.last_answer) {
            (Some(first), Some(last)) => last - first,
            _ => return (c.accepted, 0.0),
        };
        (
            c.accepted,
            c.busy.as_secs_f64() / span.as_secs_f64().max(1e-9),
        )
    }

    /// Uses up the Google project's per-minute quota for `d` (as other callers
    /// of the same Google Cloud project would): meanwhile every Gmail send, of
    /// any account, answers 429 `rateLimitExceeded` with Google Cloud's quota
    /// message and no time to retry at.
    pub fn exhaust_gmail_project_quota(&self, d: Duration) {
        self.state.lock().unwrap().gmail_project_exhausted_until =
            Some(std::time::Instant::now() + d);
    }

    /// How many Gmail sends of `account` were refused for the project's quota.
    pub fn project_throttled(&self, account: &str) -> u64 {
        let s = self.state.lock().unwrap();
        s.gmail_project_throttled.get(account).copied().unwrap_or(0)
    }

    /// Blocks `account` from sending, as Exchange does to an account on
    /// Restricted entities: its `sendMail` answers 403
    /// `ErrorMessageSubmissionBlocked` until [`StandIns::unblock_sending`].
    pub fn block_sending(&self, account: &str) {
        let mut s = self.state.lock().unwrap();
        s.graph_blocked.insert(account.to_ascii_lowercase());
    }

    /// An admin released `account` from Restricted entities.
    pub fn unblock_sending(&self, account: &str) {
        let mut s = self.state.lock().unwrap();
        s.graph_blocked.remove(&account.to_ascii_lowercase());
    }

    /// Graph's concurrent requests per mailbox (default: the documented 4).
    pub fn set_graph_concurrency(&self, limit: usize) {
        self.state.lock().unwrap().graph_concurrency = Some(limit.max(1));
    }

    /// Delays every send answer (a slow provider).
    pub fn set_send_delay(&self, d: Duration) {
        self.state.lock().unwrap().send_delay = d;
    }

    /// Delays every token answer.
    pub fn set_token_delay(&self, d: Duration) {
        self.state.lock().unwrap().token_delay = d;
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

    /// Ids of the Graph drafts not sent nor deleted yet.
    pub fn graph_drafts(&self) -> Vec<String> {
        self.state
            .lock()
            .unwrap()
            .graph_drafts
            .keys()
            .cloned()
            .collect()
    }

    /// Ids of the Graph drafts deleted (`DELETE /v1.0/me/messages/{id}`), oldest first.
    pub fn graph_deleted_drafts(&self) -> Vec<String> {
        self.state.lock().unwrap().graph_deleted_drafts.clone()
    }

    /// Answers the next `PUT`s on Graph upload URLs with these responses, in order.
    pub fn script_graph_uploads(&self, responses: impl IntoIterator<Item = ResponseTemplate>) {
        self.state
            .lock()
            .unwrap()
            .graph_upload_script
            .extend(responses);
    }

    /// How long a Graph upload session lives without a fragment.
    pub fn set_graph_upload_session_ttl(&self, ttl: Duration) {
        self.state.lock().unwrap().graph_upload_ttl = Some(ttl);
    }

    /// The tenant's maximum message size, base64 attachments included.
    pub fn set_graph_max_message_bytes(&self, max: usize) {
        self.state.lock().unwrap().graph_max_message_bytes = Some(max);
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
