//! The hosted settings page ("portal"): the organization's "Email sending"
//! screen, which any host application can link to instead of building it.
//!
//! 1. The host application asks for a link, server to server
//!    (`POST /v1/organizations/{org}/portal-sessions`, admin token), and sends its
//!    admin there. The link is single use and valid for [`PORTAL_LINK_TTL`].
//! 2. Opening it (`GET /portal/start?token=…`) starts a browser session bound to
//!    that organization only: a random cookie (`HttpOnly`, `SameSite=Lax`,
//!    `Path=/portal`, `Secure` behind an https public URL) whose SHA-256 is
//!    stored, then a redirect to `/portal`, so the token leaves the address bar.
//! 3. The page is server-rendered (minijinja), without script. Every form carries
//!    the session's synchronizer token (CSRF) and the responses a strict
//!    Content-Security-Policy, `X-Frame-Options: DENY` and `no-referrer`.
//!
//! Connecting reuses the admin API's flow with one difference: the OAuth `state`
//! and then the pending consent are bound to the session that started them. The
//! callback sends the browser to `/portal/return` with the one-time `connection`
//! value, which confirms the consent only together with that session's cookie.
//! A consent finished in another browser (consent phishing) thus never attaches:
//! that browser has the value but not the cookie, and the session that has the
//! cookie never sees the value. Save and test and disconnect are the admin API's
//! own code (`sender.rs`, `integration.rs`); test sends are rate limited per
//! organization.

mod texts;

use std::time::Duration;

use axum::Json;
use axum::extract::{Form, FromRequest, FromRequestParts, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use mail_dispatch_domain::{EmailAddress, ProviderKind};
use mail_dispatch_store::{
    Fallback, Integration, IntegrationStatus, LinkLookup, PortalSettings, SessionLookup,
};
use minijinja::value::Serde;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq as _;
use utoipa::ToSchema;

use crate::AdminState;
use crate::connect::{ConfirmStatus, random_token, start_authorization};
use crate::error::{ApiError, ApiErrorCode, ErrorBody};
use crate::extract::{ApiJson, OrgId};
use crate::sender::{SenderChoice, SenderProblem, TestStatus, parse_sender, save_and_test};
pub(crate) use texts::Locale;

/// How long a portal link can be opened.
pub const PORTAL_LINK_TTL: Duration = Duration::from_secs(300);
/// A portal session's lifetime by default (`MAIL_DISPATCH_PORTAL_SESSION_SECS`).
pub const PORTAL_SESSION_TTL: Duration = Duration::from_secs(3600);
/// Test sends from the portal per organization within [`TEST_SEND_WINDOW`].
pub const TEST_SENDS_PER_WINDOW: i64 = 5;
pub const TEST_SEND_WINDOW: Duration = Duration::from_secs(600);
/// The session cookie.
const COOKIE: &str = "mail_dispatch_portal";
/// Longest product name a host application may pass.
const MAX_PRODUCT_NAME: usize = 60;

/// Templates and the response policy, built once.
pub(crate) struct Portal {
    env: minijinja::Environment<'static>,
    csp: HeaderValue,
}

impl std::fmt::Debug for Portal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Portal").finish_non_exhaustive()
    }
}

impl Portal {
    /// `authorize_origins`: the providers' consent pages, which the connect
    /// form's redirect must be allowed to reach (`form-action` applies to the
    /// redirects that follow a form's submission too).
    pub(crate) fn new(authorize_origins: &[url::Origin]) -> Self {
        let mut env = minijinja::Environment::new();
        for (name, source) in [
            ("base.html", include_str!("../../templates/base.html")),
            ("portal.html", include_str!("../../templates/portal.html")),
            ("message.html", include_str!("../../templates/message.html")),
        ] {
            env.add_template(name, source)
                .expect("the portal's templates are valid");
        }
        let mut form_action = vec!["'self'".to_owned()];
        for origin in authorize_origins {
            if origin.is_tuple() {
                form_action.push(origin.ascii_serialization());
            }
        }
        let csp = format!(
            "default-src 'none'; style-src 'self'; img-src 'self'; base-uri 'none'; \
             frame-ancestors 'none'; form-action {}",
            form_action.join(" ")
        );
        Portal {
            env,
            csp: HeaderValue::from_str(&csp).expect("origins are ASCII"),
        }
    }
}

// ---------------------------------------------------------------------------
// The host application's request for a link.

#[derive(Debug, Deserialize, ToSchema)]
pub struct PortalSessionRequest {
    /// The host application's page to go back to (its origin must be allowed,
    /// `MAIL_DISPATCH_RETURN_ORIGINS`).
    pub return_url: String,
    /// `en` or `fr`; default: the browser's `Accept-Language`.
    pub locale: Option<String>,
    /// The host application's name, shown in the page (1 to 60 characters).
    pub product_name: Option<String>,
    /// Accent colour of buttons and header, `#RRGGBB`.
    pub accent_color: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PortalSessionResponse {
    /// Send the admin's browser here. Opens the page once.
    pub url: String,
    /// The link stops working at this instant (a few minutes).
    pub expires_at: DateTime<Utc>,
}

/// `#RRGGBB`, lower-cased; anything else is refused (it lands in CSS).
pub(crate) fn parse_accent(raw: &str) -> Option<String> {
    let hex = raw.strip_prefix('#')?;
    (hex.len() == 6 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| format!("#{}", hex.to_ascii_lowercase()))
}

/// The text colour on the accent with the better contrast (WCAG 2 relative luminance).
pub(crate) fn on_accent(accent: &str) -> &'static str {
    let channel = |i: usize| {
        let v = f64::from(u8::from_str_radix(&accent[i..i + 2], 16).unwrap_or(0)) / 255.0;
        if v <= 0.04045 {
            v / 12.92
        } else {
            ((v + 0.055) / 1.055).powf(2.4)
        }
    };
    let l = 0.2126 * channel(1) + 0.7152 * channel(3) + 0.0722 * channel(5);
    let with_white = 1.05 / (l + 0.05);
    let with_dark = (l + 0.05) / 0.05;
    if with_white >= with_dark {
        "#ffffff"
    } else {
        "#111111"
    }
}

fn sha256(value: &str) -> Vec<u8> {
    use sha2::Digest as _;
    sha2::Sha256::digest(value.as_bytes()).to_vec()
}

/// The portal's root, under the public URL (`…/portal`).
fn portal_root(state: &AdminState) -> String {
    format!(
        "{}/portal",
        state.config.public_url.as_str().trim_end_matches('/')
    )
}

/// The path part of [`portal_root`]: links in pages and the cookie's `Path`.
fn portal_path(state: &AdminState) -> String {
    format!(
        "{}/portal",
        state.config.public_url.path().trim_end_matches('/')
    )
}

/// Issues a single-use link to the hosted settings page of `{org}`.
#[utoipa::path(post, path = "/v1/organizations/{org}/portal-sessions", tag = "portal",
    params(("org" = String, Path, description = "Organization id")),
    request_body = PortalSessionRequest,
    responses((status = 200, body = PortalSessionResponse),
              (status = 401, body = ErrorBody),
              (status = 422, body = ErrorBody, description = "return_to_not_allowed, invalid_request")),
    security(("admin_token" = [])))]
pub async fn create_portal_session(
    State(state): State<AdminState>,
    OrgId(org): OrgId,
    ApiJson(req): ApiJson<PortalSessionRequest>,
) -> Result<Json<PortalSessionResponse>, ApiError> {
    let return_url = url::Url::parse(&req.return_url)
        .map_err(|_| ApiError::invalid("return_url must be an absolute URL"))?;
    if !state.config.return_origins.contains(&return_url.origin()) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            ApiErrorCode::ReturnToNotAllowed,
            "return_url is not on an allowed origin (MAIL_DISPATCH_RETURN_ORIGINS)",
        ));
    }
    let locale = match req.locale.as_deref() {
        None => None,
        Some(raw) => Some(
            Locale::parse(raw)
                .ok_or_else(|| ApiError::invalid("locale must be `en` or `fr`"))?
                .as_str()
                .to_owned(),
        ),
    };
    let product_name = match req.product_name.as_deref().map(str::trim) {
        None => None,
        Some(name)
            if !name.is_empty()
                && name.chars().count() <= MAX_PRODUCT_NAME
                && !name.chars().any(char::is_control) =>
        {
            Some(name.to_owned())
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "product_name must be 1 to 60 characters, without control characters",
            ));
        }
    };
    let accent_color = match req.accent_color.as_deref() {
        None => None,
        Some(raw) => Some(
            parse_accent(raw).ok_or_else(|| ApiError::invalid("accent_color must be #RRGGBB"))?,
        ),
    };
    let token = random_token();
    let settings = PortalSettings {
        organization_id: org.clone(),
        return_url: return_url.to_string(),
        locale,
        product_name,
        accent_color,
    };
    let expires_at = state
        .services
        .store
        .create_portal_link(&sha256(&token), &settings, PORTAL_LINK_TTL)
        .await?;
    tracing::info!(org.id = %org, %expires_at, "portal link issued");
    Ok(Json(PortalSessionResponse {
        url: format!("{}/start?token={token}", portal_root(&state)),
        expires_at,
    }))
}

// ---------------------------------------------------------------------------
// Responses: headers, pages.

/// The headers of every portal response.
pub(crate) async fn security_headers(
    State(state): State<AdminState>,
    request: Request,
    next: Next,
) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_SECURITY_POLICY, state.portal.csp.clone());
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

/// The session's choices, or the deployment's defaults.
struct Look {
    locale: Locale,
    product: String,
    return_url: Option<String>,
}

impl Look {
    fn anonymous(state: &AdminState, headers: &HeaderMap, return_url: Option<String>) -> Look {
        Look {
            locale: Locale::from_accept_language(accept_language(headers)),
            product: state.config.product_name.clone(),
            return_url,
        }
    }

    fn of(state: &AdminState, headers: &HeaderMap, s: &PortalSettings) -> Look {
        Look {
            locale: s
                .locale
                .as_deref()
                .and_then(Locale::parse)
                .unwrap_or_else(|| Locale::from_accept_language(accept_language(headers))),
            product: s
                .product_name
                .clone()
                .unwrap_or_else(|| state.config.product_name.clone()),
            return_url: Some(s.return_url.clone()),
        }
    }

    /// A sentence with its placeholders filled (`{product}` always).
    fn say(&self, key: &str, fill: &[(&str, &str)]) -> String {
        let mut s = self.locale.text(key).replace("{product}", &self.product);
        for (k, v) in fill {
            s = s.replace(&format!("{{{k}}}"), v);
        }
        s
    }
}

fn accept_language(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::ACCEPT_LANGUAGE)
        .and_then(|v| v.to_str().ok())
}

fn html(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        body,
    )
        .into_response()
}

fn render(
    state: &AdminState,
    template: &str,
    status: StatusCode,
    ctx: minijinja::Value,
) -> Response {
    match state
        .portal
        .env
        .get_template(template)
        .and_then(|t| t.render(ctx))
    {
        Ok(body) => html(status, body),
        Err(e) => {
            tracing::error!(error = %e, template, "portal template failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response()
        }
    }
}

/// A page with a heading, a sentence and, when known, the way back.
fn message(
    state: &AdminState,
    look: &Look,
    status: StatusCode,
    heading: &str,
    text: &str,
) -> Response {
    let ctx = minijinja::context! {
        lang => look.locale.as_str(),
        root => portal_path(state),
        product => &look.product,
        back => look.say("back", &[]),
        return_url => &look.return_url,
        heading => look.say(heading, &[]),
        text => look.say(text, &[]),
    };
    render(state, "message.html", status, ctx)
}

fn see_other(location: &str) -> Response {
    (StatusCode::SEE_OTHER, [(header::LOCATION, location)]).into_response()
}

// ---------------------------------------------------------------------------
// Links and sessions.

#[derive(Debug, Deserialize)]
pub(crate) struct StartQuery {
    token: Option<String>,
}

/// Opens a link: starts the session, then the page.
pub(crate) async fn start(
    State(state): State<AdminState>,
    headers: HeaderMap,
    Query(q): Query<StartQuery>,
) -> Response {
    let anonymous = |return_url| Look::anonymous(&state, &headers, return_url);
    let Some(token) = q.token.filter(|t| !t.is_empty() && t.len() <= 200) else {
        return message(
            &state,
            &anonymous(None),
            StatusCode::NOT_FOUND,
            "link_unknown_heading",
            "link_unknown_text",
        );
    };
    let store = &state.services.store;
    let settings = match store.use_portal_link(&sha256(&token)).await {
        Ok(LinkLookup::Valid(settings)) => settings,
        Ok(LinkLookup::Expired { return_url }) => {
            tracing::info!("portal link opened after its expiry");
            return message(
                &state,
                &anonymous(Some(return_url)),
                StatusCode::GONE,
                "link_expired_heading",
                "link_expired_text",
            );
        }
        Ok(LinkLookup::Used { return_url }) => {
            tracing::info!("portal link opened a second time");
            return message(
                &state,
                &anonymous(Some(return_url)),
                StatusCode::CONFLICT,
                "link_used_heading",
                "link_used_text",
            );
        }
        Ok(LinkLookup::Unknown) => {
            tracing::warn!("portal link unknown (forged or mistyped)");
            return message(
                &state,
                &anonymous(None),
                StatusCode::NOT_FOUND,
                "link_unknown_heading",
                "link_unknown_text",
            );
        }
        Err(e) => return failure(&state, &anonymous(None), &e),
    };
    let cookie = random_token();
    let csrf = random_token();
    let lifetime = state.config.portal_session_ttl;
    if let Err(e) = store
        .create_portal_session(&sha256(&cookie), &settings, &csrf, lifetime)
        .await
    {
        return failure(&state, &anonymous(Some(settings.return_url)), &e);
    }
    tracing::info!(org.id = %settings.organization_id, "portal session started");
    let secure = if state.config.public_url.scheme() == "https" {
        "; Secure"
    } else {
        ""
    };
    let set_cookie = format!(
        "{COOKIE}={cookie}; Path={}; Max-Age={}; HttpOnly; SameSite=Lax{secure}",
        portal_path(&state),
        lifetime.as_secs()
    );
    let mut response = see_other(&portal_path(&state));
    match HeaderValue::from_str(&set_cookie) {
        Ok(v) => {
            response.headers_mut().insert(header::SET_COOKIE, v);
        }
        Err(_) => return (StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response(),
    }
    response
}

fn failure(state: &AdminState, look: &Look, e: &dyn std::fmt::Display) -> Response {
    tracing::error!(error = %e, "portal request failed");
    let ctx = minijinja::context! {
        lang => look.locale.as_str(),
        root => portal_path(state),
        product => &look.product,
        back => look.say("back", &[]),
        return_url => &look.return_url,
        heading => look.say("title", &[]),
        text => look.say("notice_failed", &[]),
    };
    render(state, "message.html", StatusCode::SERVICE_UNAVAILABLE, ctx)
}

/// A live session, found by its cookie.
pub(crate) struct Session {
    settings: PortalSettings,
    csrf: String,
    hash: Vec<u8>,
    look: Look,
}

impl Session {
    fn org(&self) -> &str {
        &self.settings.organization_id
    }

    /// Whether a form's token is this session's (constant time).
    fn csrf_ok(&self, presented: &str) -> bool {
        !presented.is_empty() && bool::from(presented.as_bytes().ct_eq(self.csrf.as_bytes()))
    }
}

fn cookie_value(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (name, value) = pair.trim().split_once('=')?;
            (name == COOKIE && !value.is_empty() && value.len() <= 200).then_some(value)
        })
}

/// The session of this browser; rejected with the page that says there is none.
impl FromRequestParts<AdminState> for Session {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AdminState,
    ) -> Result<Self, Self::Rejection> {
        session(state, &parts.headers).await
    }
}

/// The forms of the page: each carries the session's CSRF token.
pub(crate) trait SessionForm: DeserializeOwned + Send {
    fn csrf(&self) -> &str;
}

/// A form posted from this session's page: its session, and the form once its
/// CSRF token was checked. Rejected with the "no session" page, the form's own
/// rejection, or (a token that is not the session's) the page again with
/// nothing done.
pub(crate) struct Posted<T> {
    session: Session,
    form: T,
}

impl<T: SessionForm> FromRequest<AdminState> for Posted<T> {
    type Rejection = Response;

    async fn from_request(req: Request, state: &AdminState) -> Result<Self, Self::Rejection> {
        let (parts, body) = req.into_parts();
        let session = session(state, &parts.headers).await?;
        let Form(form) = Form::<T>::from_request(Request::from_parts(parts, body), state)
            .await
            .map_err(IntoResponse::into_response)?;
        if !session.csrf_ok(form.csrf()) {
            return Err(forged(state, &session).await);
        }
        Ok(Posted { session, form })
    }
}

/// The session of this browser, or the page that says there is none.
async fn session(state: &AdminState, headers: &HeaderMap) -> Result<Session, Response> {
    let anonymous = |return_url| Look::anonymous(state, headers, return_url);
    let Some(cookie) = cookie_value(headers) else {
        return Err(message(
            state,
            &anonymous(None),
            StatusCode::UNAUTHORIZED,
            "session_expired_heading",
            "session_expired_text",
        ));
    };
    let hash = sha256(cookie);
    match state.services.store.portal_session(&hash).await {
        Ok(SessionLookup::Valid(s)) => Ok(Session {
            look: Look::of(state, headers, &s.settings),
            settings: s.settings,
            csrf: s.csrf_token,
            hash,
        }),
        Ok(SessionLookup::Expired { return_url }) => Err(message(
            state,
            &anonymous(Some(return_url)),
            StatusCode::UNAUTHORIZED,
            "session_expired_heading",
            "session_expired_text",
        )),
        Ok(SessionLookup::Unknown) => Err(message(
            state,
            &anonymous(None),
            StatusCode::UNAUTHORIZED,
            "session_expired_heading",
            "session_expired_text",
        )),
        Err(e) => Err(failure(state, &anonymous(None), &e)),
    }
}

// ---------------------------------------------------------------------------
// The page.

/// A message above the page.
#[derive(Debug, Serialize)]
struct Notice {
    /// `success` or `error`.
    kind: &'static str,
    text: String,
    detail: Option<String>,
}

impl Notice {
    fn success(text: String) -> Self {
        Notice {
            kind: "success",
            text,
            detail: None,
        }
    }
    fn error(text: String) -> Self {
        Notice {
            kind: "error",
            text,
            detail: None,
        }
    }
}

/// The sender form as shown: what was typed, and what is wrong with it.
#[derive(Debug, Default, Serialize)]
struct SenderForm {
    email: String,
    name: String,
    fallback: bool,
    email_error: Option<String>,
    name_error: Option<String>,
}

fn provider_label(look: &Look, provider: ProviderKind) -> String {
    match provider {
        ProviderKind::Google => look.say("provider_google", &[]),
        _ => look.say("provider_microsoft", &[]),
    }
}

fn display_from(email: &str, name: Option<&str>) -> String {
    match name {
        Some(name) => format!("{name} <{email}>"),
        None => email.to_owned(),
    }
}

/// A failed test's reason in plain words, then the provider's own message.
fn test_reason(look: &Look, error: &serde_json::Value) -> (String, Option<String>) {
    let key = match error["code"].as_str() {
        Some("sender_not_allowed") => "test_sender_not_allowed",
        Some("auth_revoked") => "test_auth_revoked",
        _ => "test_other",
    };
    (
        look.say(key, &[]),
        error["message"].as_str().map(str::to_owned),
    )
}

fn format_at(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%d %H:%M UTC").to_string()
}

/// Renders the settings page of the session's organization.
async fn page(
    state: &AdminState,
    session: &Session,
    status_code: StatusCode,
    notice: Option<Notice>,
    form: Option<SenderForm>,
) -> Response {
    let integration = match state.services.store.integration(session.org()).await {
        Ok(i) => i,
        Err(e) => return failure(state, &session.look, &e),
    };
    let look = &session.look;
    let service = state.services.senders.tokens.service();
    let providers: Vec<_> = [ProviderKind::Microsoft, ProviderKind::Google]
        .into_iter()
        .filter(|p| service.is_configured(*p))
        .map(|p| {
            minijinja::context! {
                id => p.as_str(),
                label => look.say(if p == ProviderKind::Microsoft { "connect_microsoft" } else { "connect_google" }, &[]),
            }
        })
        .collect();
    let (status, status_label, status_text, provider) = status_lines(look, integration.as_ref());
    let paused = match &integration {
        Some(i) => match state.services.store.mailbox_pause(session.org()).await {
            Ok(pause) => pause.map(|(until, reason)| {
                let key = if reason == "sending_blocked" {
                    "paused_sending_blocked"
                } else {
                    "paused_throttled"
                };
                let provider = provider_label(look, i.provider);
                let until = format_at(until);
                minijinja::context! {
                    reason => reason,
                    text => look.say(key, &[("provider", &provider), ("until", &until)]),
                }
            }),
            Err(e) => return failure(state, &session.look, &e),
        },
        None => None,
    };
    let last_test = integration.as_ref().and_then(|i| last_test_line(look, i));
    let account = integration
        .as_ref()
        .and_then(|i| i.account_email.clone())
        .unwrap_or_default();
    let form = form.unwrap_or_else(|| match &integration {
        Some(i) => SenderForm {
            email: i
                .sender_email
                .clone()
                .or_else(|| i.account_email.clone())
                .unwrap_or_default(),
            name: i.sender_name.clone().unwrap_or_default(),
            fallback: i.fallback == Fallback::PlatformSender,
            ..SenderForm::default()
        },
        None => SenderForm::default(),
    });
    let email_hint = match integration.as_ref().map(|i| i.provider) {
        Some(ProviderKind::Google) => look.say("sender_email_hint_google", &[]),
        _ => look.say("sender_email_hint_microsoft", &[]),
    };
    let ctx = minijinja::context! {
        lang => look.locale.as_str(),
        root => portal_path(state),
        product => &look.product,
        back => look.say("back", &[]),
        return_url => &look.return_url,
        heading => look.say("title", &[]),
        lead => look.say("lead", &[]),
        t => minijinja::Value::from(Serde(look.locale.all())),
        csrf => &session.csrf,
        notice => notice.map(|n| minijinja::Value::from(Serde(n))),
        status => status,
        status_label => status_label,
        status_text => status_text,
        last_test => last_test,
        paused => paused,
        providers => providers,
        connect_help => look.say("connect_help", &[]),
        form => minijinja::Value::from(Serde(form)),
        email_hint => email_hint,
        fallback_label => look.say("fallback_label", &[]),
        save_hint => look.say("save_hint", &[("account", &account)]),
        disconnect_text => look.say("disconnect_text", &[("provider", &provider)]),
        disconnect_confirm => look.say("disconnect_confirm", &[]),
    };
    render(state, "portal.html", status_code, ctx)
}

/// (status code, label, sentence, provider label) of the status card.
fn status_lines(
    look: &Look,
    integration: Option<&Integration>,
) -> (&'static str, String, String, String) {
    let Some(i) = integration else {
        return (
            "not_configured",
            look.say("status_not_configured", &[]),
            look.say("status_not_configured_text", &[]),
            String::new(),
        );
    };
    let provider = provider_label(look, i.provider);
    let account = i.account_email.clone().unwrap_or_default();
    let from = i
        .sender_email
        .as_deref()
        .map(|e| display_from(e, i.sender_name.as_deref()))
        .unwrap_or_default();
    let fill = [
        ("provider", provider.as_str()),
        ("account", account.as_str()),
        ("from", from.as_str()),
    ];
    let (code, label, text) = match i.status {
        IntegrationStatus::Active => (
            "active",
            look.say("status_active", &[]),
            look.say("status_active_text", &fill),
        ),
        IntegrationStatus::NeedsReauth => {
            let reason = i.last_error.clone().unwrap_or_default();
            let meanwhile = if i.fallback == Fallback::PlatformSender {
                look.say("needs_reauth_fallback", &[])
            } else {
                look.say("needs_reauth_no_fallback", &[])
            };
            (
                "needs_reauth",
                look.say("status_needs_reauth", &[]),
                format!(
                    "{} {meanwhile}",
                    look.say(
                        "status_needs_reauth_text",
                        &[("provider", &provider), ("reason", &reason)]
                    )
                ),
            )
        }
        _ => (
            "pending_sender",
            look.say("status_pending_sender", &[]),
            look.say("status_pending_sender_text", &fill),
        ),
    };
    (code, label, text, provider)
}

fn last_test_line(look: &Look, i: &Integration) -> Option<minijinja::Value> {
    let test = i.last_test.as_ref()?;
    let at = format_at(i.last_test_at?);
    let from = display_from(
        test["sender"]["email"].as_str().unwrap_or_default(),
        test["sender"]["name"].as_str(),
    );
    let sent = test["status"].as_str() == Some(TestStatus::Sent.as_str());
    let text = if sent {
        look.say("last_test_sent", &[("at", &at), ("from", &from)])
    } else {
        // The provider's own words are in the notice after the test, not here.
        let (reason, _) = test_reason(look, &test["error"]);
        look.say(
            "last_test_failed",
            &[("at", &at), ("from", &from), ("reason", &reason)],
        )
    };
    Some(minijinja::context! {
        status => if sent { "sent" } else { "failed" },
        text => text,
    })
}

#[derive(Debug, Deserialize)]
pub(crate) struct PageQuery {
    notice: Option<String>,
    error: Option<String>,
}

/// `GET /portal`.
pub(crate) async fn show(
    State(state): State<AdminState>,
    session: Session,
    Query(q): Query<PageQuery>,
) -> Response {
    let notice = match (q.notice.as_deref(), q.error.as_deref()) {
        (_, Some(code)) => Some(Notice::error(error_text(&session.look, code))),
        (Some(kind), None) => notice_text(&state, &session, kind).await,
        _ => None,
    };
    page(&state, &session, StatusCode::OK, notice, None).await
}

/// The sentence for an error code of the connect flow (`error=` in the query:
/// only `[a-z_]` codes are shown, and only through a sentence of ours).
fn error_text(look: &Look, code: &str) -> String {
    let safe = !code.is_empty()
        && code.len() <= 64
        && code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
    let key = format!("err_{code}");
    if safe && Locale::has(&key) {
        look.say(&key, &[])
    } else if safe {
        look.say("err_generic", &[("code", code)])
    } else {
        look.say("err_generic", &[("code", "provider_error")])
    }
}

/// The success notices after a redirect, filled from the stored integration.
async fn notice_text(state: &AdminState, session: &Session, kind: &str) -> Option<Notice> {
    let look = &session.look;
    let integration = state
        .services
        .store
        .integration(session.org())
        .await
        .ok()
        .flatten();
    let provider = integration
        .as_ref()
        .map(|i| provider_label(look, i.provider))
        .unwrap_or_default();
    let account = integration
        .as_ref()
        .and_then(|i| i.account_email.clone())
        .unwrap_or_default();
    Some(match kind {
        "connected" => Notice::success(look.say(
            "notice_connected",
            &[("provider", &provider), ("account", &account)],
        )),
        "reconnected_active" => Notice::success(look.say("notice_reconnected_active", &[])),
        "reconnected_failed" => Notice::error(look.say("notice_reconnected_failed", &[])),
        "disconnected" => Notice::success(look.say("notice_disconnected", &[])),
        "test_sent" | "test_failed" => {
            let test = integration.as_ref()?.last_test.as_ref()?;
            let from = display_from(
                test["sender"]["email"].as_str().unwrap_or_default(),
                test["sender"]["name"].as_str(),
            );
            if test["status"].as_str() == Some(TestStatus::Sent.as_str()) {
                Notice::success(look.say(
                    "notice_test_sent",
                    &[("from", &from), ("account", &account)],
                ))
            } else {
                let (reason, detail) = test_reason(look, &test["error"]);
                Notice {
                    kind: "error",
                    text: look.say("notice_test_failed", &[("reason", &reason)]),
                    detail,
                }
            }
        }
        _ => return None,
    })
}

// ---------------------------------------------------------------------------
// Actions.

#[derive(Debug, Deserialize)]
pub(crate) struct ConnectForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    provider: String,
}

impl SessionForm for ConnectForm {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}

/// `POST /portal/connect`: to the provider's consent page, with a state bound
/// to this session.
pub(crate) async fn connect(
    State(state): State<AdminState>,
    Posted { session, form }: Posted<ConnectForm>,
) -> Response {
    let provider = match ProviderKind::parse(&form.provider) {
        Some(p @ (ProviderKind::Microsoft | ProviderKind::Google)) => p,
        _ => return (StatusCode::BAD_REQUEST, "unknown provider").into_response(),
    };
    let return_to = format!("{}/return", portal_root(&state));
    match start_authorization(
        &state,
        session.org(),
        provider,
        &return_to,
        Some(&session.hash),
    )
    .await
    {
        Ok(started) => {
            tracing::info!(org.id = %session.org(), %provider, "portal: connect started");
            see_other(started.authorization_url.as_str())
        }
        Err(e) => {
            tracing::warn!(org.id = %session.org(), %provider, code = e.code.as_str(), "portal: connect could not start");
            let text = error_text(&session.look, e.code.as_str());
            page(&state, &session, e.status, Some(Notice::error(text)), None).await
        }
    }
}

/// A form without this session's token: shown the page again, nothing done.
async fn forged(state: &AdminState, session: &Session) -> Response {
    tracing::warn!(org.id = %session.org(), "portal: form without the session's CSRF token refused");
    let text = session.look.say("notice_form_expired", &[]);
    page(
        state,
        session,
        StatusCode::FORBIDDEN,
        Some(Notice::error(text)),
        None,
    )
    .await
}

#[derive(Debug, Deserialize)]
pub(crate) struct ReturnQuery {
    status: Option<String>,
    error: Option<String>,
    connection: Option<String>,
}

/// `GET /portal/return`: where the callback sends the browser. A consent is
/// confirmed only with the cookie of the session that started it.
pub(crate) async fn back(
    State(state): State<AdminState>,
    headers: HeaderMap,
    Query(q): Query<ReturnQuery>,
) -> Response {
    let session = match cookie_value(&headers) {
        // No session here: whatever came back was started elsewhere.
        None => {
            tracing::warn!(
                "portal: a consent came back to a browser without a portal session; not attached"
            );
            let look = Look::anonymous(&state, &headers, None);
            return message(
                &state,
                &look,
                StatusCode::FORBIDDEN,
                "other_browser_heading",
                "err_other_browser",
            );
        }
        Some(_) => match session(&state, &headers).await {
            Ok(s) => s,
            Err(page) => return page,
        },
    };
    let root = portal_path(&state);
    let org = session.org().to_owned();
    match (q.status.as_deref(), q.connection.as_deref()) {
        (Some("connected"), Some(connection))
            if !connection.is_empty() && connection.len() <= 200 =>
        {
            match crate::connect::confirm_connection(&state, &org, connection, Some(&session.hash))
                .await
            {
                Ok(confirmed) => {
                    let notice = match confirmed.status {
                        ConfirmStatus::Connected => "connected",
                        ConfirmStatus::Active => "reconnected_active",
                        ConfirmStatus::TestFailed => "reconnected_failed",
                    };
                    tracing::info!(org.id = %org, outcome = notice, "portal: consent confirmed by its own session");
                    see_other(&format!("{root}?notice={notice}"))
                }
                Err(e) => {
                    let error = match e.code {
                        ApiErrorCode::ConnectionUnknown => {
                            tracing::warn!(org.id = %org, "portal: a consent of another session came back; not attached");
                            "other_browser"
                        }
                        ApiErrorCode::ConnectionExpired => "connection_expired",
                        ApiErrorCode::ConnectionUsed => "connection_used",
                        _ => {
                            tracing::error!(org.id = %org, error = %e.message, "portal: confirmation failed");
                            let text = session.look.say("notice_failed", &[]);
                            return page(
                                &state,
                                &session,
                                StatusCode::SERVICE_UNAVAILABLE,
                                Some(Notice::error(text)),
                                None,
                            )
                            .await;
                        }
                    };
                    see_other(&format!("{root}?error={error}"))
                }
            }
        }
        (Some("error"), _) => {
            let code = q.error.as_deref().unwrap_or("provider_error");
            tracing::info!(org.id = %org, error = code, "portal: connect refused or failed");
            let mut location = url::Url::parse("http://portal.invalid/").expect("valid");
            location.query_pairs_mut().append_pair("error", code);
            see_other(&format!("{root}?{}", location.query().unwrap_or_default()))
        }
        _ => see_other(&root),
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct SenderFormInput {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    email: String,
    #[serde(default)]
    name: String,
    fallback: Option<String>,
}

impl SessionForm for SenderFormInput {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}

/// `POST /portal/sender`: save and test, with the API's rules and code.
pub(crate) async fn save_sender(
    State(state): State<AdminState>,
    Posted {
        session,
        form: input,
    }: Posted<SenderFormInput>,
) -> Response {
    let look = &session.look;
    let org = session.org().to_owned();
    let store = &state.services.store;
    let integration = match store.integration(&org).await {
        Ok(Some(i)) => i,
        Ok(None) => {
            let text = look.say("notice_not_connected", &[]);
            return page(
                &state,
                &session,
                StatusCode::CONFLICT,
                Some(Notice::error(text)),
                None,
            )
            .await;
        }
        Err(e) => return failure(&state, look, &e),
    };
    let mut form = SenderForm {
        email: input.email.trim().to_owned(),
        name: input.name.trim().to_owned(),
        fallback: input.fallback.as_deref() == Some("platform_sender"),
        ..SenderForm::default()
    };
    let sender = match parse_sender(&input.email, Some(&input.name)) {
        Ok(sender) => sender,
        Err(problem) => {
            match &problem {
                SenderProblem::InvalidEmail => {
                    form.email_error = Some(look.say("field_invalid_email", &[]));
                }
                SenderProblem::NameWithAt => {
                    form.name_error = Some(look.say("field_name_with_at", &[]));
                }
                SenderProblem::Name(reason) => {
                    form.name_error = Some(look.say("field_name_invalid", &[("reason", reason)]));
                }
            }
            tracing::info!(org.id = %org, problem = %problem, "portal: sender refused before any test");
            let text = look.say("notice_invalid_sender", &[]);
            return page(
                &state,
                &session,
                StatusCode::UNPROCESSABLE_ENTITY,
                Some(Notice::error(text)),
                Some(form),
            )
            .await;
        }
    };
    let Some(recipient) = integration
        .account_email
        .as_deref()
        .and_then(|a| EmailAddress::parse(a).ok())
    else {
        return failure(&state, look, &"connected account without an address");
    };
    match store
        .take_portal_test_send(&org, TEST_SENDS_PER_WINDOW, TEST_SEND_WINDOW)
        .await
    {
        Ok(true) => {}
        Ok(false) => {
            tracing::warn!(org.id = %org, "portal: test send refused by the rate limit");
            let text = look.say("notice_rate_limited", &[]);
            return page(
                &state,
                &session,
                StatusCode::TOO_MANY_REQUESTS,
                Some(Notice::error(text)),
                Some(form),
            )
            .await;
        }
        Err(e) => return failure(&state, look, &e),
    }
    let fallback = if form.fallback {
        Fallback::PlatformSender
    } else {
        Fallback::None
    };
    // The portal's form has no Sent Items choice: the organization's stays.
    let choice = SenderChoice {
        sender: &sender,
        fallback,
        save_to_sent_items: integration.save_to_sent_items,
    };
    match save_and_test(&state, &org, &integration, choice, recipient).await {
        Ok(outcome) => {
            let notice = if outcome.status == TestStatus::Sent {
                "test_sent"
            } else {
                "test_failed"
            };
            tracing::info!(org.id = %org, outcome = notice, "portal: save and test");
            see_other(&format!("{}?notice={notice}", portal_path(&state)))
        }
        Err(e) if e.code == ApiErrorCode::SenderNotAllowed => {
            tracing::info!(org.id = %org, "portal: sender not allowed by the provider's rules");
            form.email_error =
                Some(look.say("field_sender_not_allowed", &[("reason", &e.message)]));
            let text = look.say("notice_invalid_sender", &[]);
            page(
                &state,
                &session,
                StatusCode::UNPROCESSABLE_ENTITY,
                Some(Notice::error(text)),
                Some(form),
            )
            .await
        }
        Err(e) => {
            tracing::error!(org.id = %org, code = e.code.as_str(), error = %e.message, "portal: save and test failed");
            let text = look.say("notice_failed", &[]);
            page(
                &state,
                &session,
                e.status,
                Some(Notice::error(text)),
                Some(form),
            )
            .await
        }
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct DisconnectForm {
    #[serde(default)]
    csrf: String,
    confirm: Option<String>,
}

impl SessionForm for DisconnectForm {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}

/// `POST /portal/disconnect`, once the admin ticked what happens next.
pub(crate) async fn disconnect(
    State(state): State<AdminState>,
    Posted { session, form }: Posted<DisconnectForm>,
) -> Response {
    if form.confirm.as_deref() != Some("yes") {
        let text = session.look.say("disconnect_confirm", &[]);
        return page(
            &state,
            &session,
            StatusCode::UNPROCESSABLE_ENTITY,
            Some(Notice::error(text)),
            None,
        )
        .await;
    }
    match crate::integration::disconnect(&state, session.org()).await {
        Ok(_) => see_other(&format!("{}?notice=disconnected", portal_path(&state))),
        Err(e) => {
            tracing::error!(org.id = %session.org(), error = %e.message, "portal: disconnect failed");
            let text = session.look.say("notice_failed", &[]);
            page(&state, &session, e.status, Some(Notice::error(text)), None).await
        }
    }
}

/// `GET /portal/style.css`.
pub(crate) async fn style() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        include_str!("../../templates/portal.css"),
    )
        .into_response()
}

/// `GET /portal/theme.css`: the session's accent colour.
pub(crate) async fn theme(State(state): State<AdminState>, headers: HeaderMap) -> Response {
    let accent = match cookie_value(&headers) {
        Some(cookie) => match state.services.store.portal_session(&sha256(cookie)).await {
            Ok(SessionLookup::Valid(s)) => s.settings.accent_color,
            _ => None,
        },
        None => None,
    };
    let body = match accent.as_deref().and_then(parse_accent) {
        Some(accent) => format!(
            ":root {{ --accent: {accent}; --on-accent: {}; }}\n",
            on_accent(&accent)
        ),
        None => String::new(),
    };
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "private, no-store"),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accent_colours_are_six_hex_digits_only() {
        assert_eq!(parse_accent("#1A2b3C").as_deref(), Some("#1a2b3c"));
        for bad in [
            "1a2b3c", "#1a2b3", "#1a2b3c4", "#12345g", "red", "#fff;}", "",
        ] {
            assert_eq!(parse_accent(bad), None, "{bad}");
        }
    }

    #[test]
    fn text_on_the_accent_keeps_its_contrast() {
        assert_eq!(on_accent("#000000"), "#ffffff");
        assert_eq!(on_accent("#2f5bd3"), "#ffffff");
        assert_eq!(on_accent("#ffd500"), "#111111");
        assert_eq!(on_accent("#ffffff"), "#111111");
    }

    #[test]
    fn the_session_cookie_is_read_among_others() {
        let mut headers = HeaderMap::new();
        headers.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; mail_dispatch_portal=abc"),
        );
        assert_eq!(cookie_value(&headers), Some("abc"));
        let mut headers = HeaderMap::new();
        headers.append(
            header::COOKIE,
            HeaderValue::from_static("xmail_dispatch_portal=abc"),
        );
        assert_eq!(cookie_value(&headers), None);
    }

    #[test]
    fn every_portal_template_renders() {
        let portal = Portal::new(&[]);
        for name in ["portal.html", "message.html"] {
            assert!(portal.env.get_template(name).is_ok(), "{name}");
        }
        assert!(
            portal
                .csp
                .to_str()
                .unwrap()
                .contains("frame-ancestors 'none'"),
            "{:?}",
            portal.csp
        );
    }
}
