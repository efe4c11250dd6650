//! The connect flow: authorize, the provider's callback, and the host
//! application's confirmation.
//!
//! 1. `authorize` returns the provider's consent page (PKCE S256, a server-side
//!    single-use `state`) and, for Microsoft, the tenant admin-consent page.
//! 2. The admin's browser comes back to `callback`. The code is exchanged, the
//!    granted scopes are checked, the account is identified by its stable ids, and
//!    the grant is kept *pending*: the browser goes back to `return_to` with a
//!    one-time `connection` value. Nothing is used yet.
//! 3. The host application, in the admin's own authenticated session, calls
//!    `confirm` with that value. Only then is the grant stored on the
//!    organization. A consent finished in somebody else's browser (consent
//!    phishing) therefore never attaches to the organization: that browser, not
//!    the admin's session, received the value. Unconfirmed grants expire and are
//!    revoked where the provider allows it (Google).

use std::time::Duration;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use base64::Engine as _;
use chrono::{DateTime, Utc};
use mail_dispatch_domain::{EmailAddress, ProviderKind};
use mail_dispatch_providers::oauth::{MICROSOFT_CONSUMER_TENANT, aadsts, id_token_claims};
use mail_dispatch_providers::{TokenGrant, scopes};
use mail_dispatch_store::{
    ConfirmLookup, Integration, NewConnection, OAuthState, StateLookup, StatePurpose,
};
use rand::RngCore as _;
use secrecy::{ExposeSecret as _, SecretString};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;
use utoipa::{IntoParams, ToSchema};

use crate::AdminState;
use crate::error::{ApiError, ApiErrorCode, ErrorBody};
use crate::extract::{ApiJson, OrgId};
use crate::integration::{IntegrationView, view_with_pause};
use crate::sender::TestOutcome;

#[derive(Debug, Deserialize, ToSchema)]
pub struct AuthorizeRequest {
    /// `microsoft` or `google`.
    pub provider: String,
    /// Where the admin's browser is sent back after consent; its origin must be allowed.
    pub return_to: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AuthorizeResponse {
    /// The provider's consent page, with `state` and a PKCE S256 challenge.
    pub authorization_url: String,
    /// Microsoft only: the page where a tenant administrator grants the app for the
    /// whole tenant (for tenants that do not let users consent). The browser comes
    /// back to `return_to` with `status=admin_consent_granted`; the admin then
    /// connects with `authorization_url` as usual.
    pub admin_consent_url: Option<String>,
    /// Both URLs' `state` stops working at this instant.
    pub expires_at: DateTime<Utc>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CallbackQuery {
    pub code: Option<String>,
    pub state: Option<String>,
    pub error: Option<String>,
    pub error_description: Option<String>,
    /// Microsoft's admin-consent return (`True`), with no code. Its `tenant`
    /// parameter is not read: Microsoft says not to rely on it.
    pub admin_consent: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct ConfirmRequest {
    /// The `connection` value the callback put in `return_to`'s query.
    pub connection: String,
}

/// The outcome of a confirmation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ConfirmStatus {
    /// Stored; the sender must now be saved and tested (`PUT …/sender`).
    Connected,
    /// A reconnect whose saved sender passed its test again: in use.
    Active,
    /// A reconnect whose saved sender did not pass its check or test: the
    /// integration is `pending_sender` until a sender passes.
    TestFailed,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ConfirmResponse {
    pub status: ConfirmStatus,
    /// The grant belongs to another account than the one connected before
    /// (Microsoft `oid`/`tid`, Google `sub`).
    pub account_changed: bool,
    /// The re-run test of the saved sender, on a reconnect.
    pub test: Option<TestOutcome>,
    pub integration: IntegrationView,
}

fn parse_provider(raw: &str) -> Result<ProviderKind, ApiError> {
    match ProviderKind::parse(raw) {
        Some(p @ (ProviderKind::Microsoft | ProviderKind::Google)) => Ok(p),
        _ => Err(ApiError::invalid(
            "provider must be `microsoft` or `google`",
        )),
    }
}

/// 256 random bits, URL-safe.
pub(crate) fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn connection_hash(connection: &str) -> Vec<u8> {
    sha2::Sha256::digest(connection.as_bytes()).to_vec()
}

/// Starts connecting a provider: returns its consent page.
#[utoipa::path(post, path = "/v1/organizations/{org}/integration/authorize", tag = "integration",
    params(("org" = String, Path, description = "Organization id")),
    request_body = AuthorizeRequest,
    responses((status = 200, body = AuthorizeResponse), (status = 401, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn authorize(
    State(state): State<AdminState>,
    OrgId(org): OrgId,
    ApiJson(req): ApiJson<AuthorizeRequest>,
) -> Result<Json<AuthorizeResponse>, ApiError> {
    let provider = parse_provider(&req.provider)?;
    let return_to = url::Url::parse(&req.return_to)
        .map_err(|_| ApiError::invalid("return_to must be an absolute URL"))?;
    if !state.config.return_origins.contains(&return_to.origin()) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            ApiErrorCode::ReturnToNotAllowed,
            "return_to is not on an allowed origin (MAIL_DISPATCH_RETURN_ORIGINS)",
        ));
    }
    let started = start_authorization(&state, &org, provider, return_to.as_str(), None).await?;
    Ok(Json(AuthorizeResponse {
        authorization_url: started.authorization_url.to_string(),
        admin_consent_url: started.admin_consent_url.map(|u| u.to_string()),
        expires_at: started.expires_at,
    }))
}

/// An authorization started: where to send the browser.
pub(crate) struct Started {
    pub(crate) authorization_url: url::Url,
    pub(crate) admin_consent_url: Option<url::Url>,
    pub(crate) expires_at: DateTime<Utc>,
}

/// Issues the states of a new authorization (the user's consent and, for
/// Microsoft, the tenant administrator's) and returns the consent pages.
/// `portal_session` binds them to the portal session that started them.
pub(crate) async fn start_authorization(
    state: &AdminState,
    org: &str,
    provider: ProviderKind,
    return_to: &str,
    portal_session: Option<&[u8]>,
) -> Result<Started, ApiError> {
    let service = state.services.senders.tokens.service();
    let not_configured = |_| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            ApiErrorCode::ProviderNotConfigured,
            format!("{provider} is not configured on this deployment"),
        )
    };
    let oauth_state = random_token();
    let (url, verifier) = service
        .authorize_url(provider, &oauth_state)
        .map_err(not_configured)?;
    let store = &state.services.store;
    let ttl = state.config.state_ttl;
    let expires_at = store
        .create_oauth_state(
            &oauth_state,
            org,
            provider,
            &verifier,
            return_to,
            ttl,
            StatePurpose::Connect,
            portal_session,
        )
        .await?;
    let admin_consent_url = if provider == ProviderKind::Microsoft {
        let admin_state = random_token();
        let url = service
            .admin_consent_url(&admin_state)
            .map_err(not_configured)?;
        store
            .create_oauth_state(
                &admin_state,
                org,
                provider,
                &verifier,
                return_to,
                ttl,
                StatePurpose::AdminConsent,
                portal_session,
            )
            .await?;
        Some(url)
    } else {
        None
    };
    tracing::info!(org.id = %org, %provider, portal = portal_session.is_some(), "authorization started");
    Ok(Started {
        authorization_url: url,
        admin_consent_url,
        expires_at,
    })
}

/// `return_to` with the outcome in its query.
fn back_to(return_to: &str, params: &[(&str, &str)]) -> Response {
    let mut url = match url::Url::parse(return_to) {
        Ok(u) => u,
        Err(_) => return (StatusCode::BAD_REQUEST, "invalid return_to").into_response(),
    };
    {
        let mut q = url.query_pairs_mut();
        for (k, v) in params {
            q.append_pair(k, v);
        }
    }
    (StatusCode::SEE_OTHER, [(header::LOCATION, url.to_string())]).into_response()
}

/// Only well-formed OAuth error codes go back in the redirect (RFC 6749 §4.1.2.1).
fn oauth_error_code(raw: &str) -> &str {
    if !raw.is_empty()
        && raw.len() <= 64
        && raw.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
    {
        raw
    } else {
        "provider_error"
    }
}

/// What a refused authorization means for the admin. Entra's AADSTS number
/// decides, not the `error` value, which varies (reference-error-codes): 65001,
/// 90093, 90094 and 90095 mean the tenant requires an administrator's approval;
/// 65004 means the user declined.
fn refusal(error: &str, description: &str) -> String {
    match aadsts(description) {
        Some(65001 | 90093 | 90094 | 90095) => "admin_approval_required".into(),
        Some(65004) => "access_denied".into(),
        _ if error == "consent_required" => "admin_approval_required".into(),
        _ => oauth_error_code(error).to_owned(),
    }
}

/// The outcome of a callback, as the query parameters of `return_to`.
struct Outcome(Vec<(&'static str, String)>);

impl Outcome {
    fn error(provider: ProviderKind, error: &str) -> Self {
        Outcome(vec![
            ("status", "error".into()),
            ("error", error.into()),
            ("provider", provider.as_str().into()),
        ])
    }

    fn with(mut self, key: &'static str, value: String) -> Self {
        self.0.push((key, value));
        self
    }
}

/// Where the admin's browser lands after the provider's consent page.
#[utoipa::path(get, path = "/v1/oauth/callback", tag = "integration", params(CallbackQuery),
    responses((status = 303, description = "Redirect to return_to with `status` (`connected` with a one-time `connection` to confirm, `admin_consent_granted`, `error`) and, on error, `error` (`access_denied`, `admin_approval_required`, `scope_not_granted` with `missing`, `no_mailbox`, `personal_account_not_supported`, `account_unknown`, `token_exchange_failed`, `no_refresh_token`, `state_expired`, `state_reused`, or the provider's code)"),
              (status = 400, description = "Unknown state: nowhere safe to redirect to")))]
pub async fn callback(State(state): State<AdminState>, Query(q): Query<CallbackQuery>) -> Response {
    let store = &state.services.store;
    let Some(oauth_state) = q
        .state
        .as_deref()
        .filter(|s| !s.is_empty() && s.len() <= 200)
    else {
        return (
            StatusCode::BAD_REQUEST,
            Html("<p>Missing state. Start again from the settings page.</p>"),
        )
            .into_response();
    };
    let pending = match store.consume_oauth_state(oauth_state).await {
        Ok(StateLookup::Valid(p)) => p,
        Ok(StateLookup::Expired { return_to }) => {
            return back_to(
                &return_to,
                &[("status", "error"), ("error", "state_expired")],
            );
        }
        Ok(StateLookup::Reused { return_to }) => {
            return back_to(
                &return_to,
                &[("status", "error"), ("error", "state_reused")],
            );
        }
        Ok(StateLookup::Unknown) => {
            tracing::warn!("OAuth callback with an unknown state");
            return (StatusCode::BAD_REQUEST, Html("<p>Unknown or forged authorization state. Start again from the settings page.</p>"))
                .into_response();
        }
        Err(e) => return ApiError::from(e).into_response(),
    };
    let outcome = match pending.purpose {
        StatePurpose::AdminConsent => admin_consent_return(&pending, &q),
        StatePurpose::Connect => match connect_return(&state, &pending, &q).await {
            Ok(outcome) => outcome,
            Err(e) => return e.into_response(),
        },
    };
    let params: Vec<(&str, &str)> = outcome.0.iter().map(|(k, v)| (*k, v.as_str())).collect();
    back_to(&pending.return_to, &params)
}

/// Microsoft's admin-consent page came back: `admin_consent=True` and no code,
/// or an error (which also carries `admin_consent`, so the error is read first).
fn admin_consent_return(pending: &OAuthState, q: &CallbackQuery) -> Outcome {
    let org = pending.organization_id.as_str();
    let provider = pending.provider;
    if let Some(error) = q.error.as_deref() {
        let description = q.error_description.as_deref().unwrap_or_default();
        tracing::info!(org.id = org, %provider, error = oauth_error_code(error), aadsts = aadsts(description), "administrator consent not given");
        let error = match aadsts(description) {
            Some(65004) => "access_denied".to_owned(),
            _ => oauth_error_code(error).to_owned(),
        };
        return Outcome::error(provider, &error);
    }
    if q.admin_consent.as_deref() == Some("True") {
        // The tenant id in the query is not proof of anything (Microsoft says not
        // to rely on it): the user's own connect, next, is what counts.
        tracing::info!(org.id = org, %provider, "tenant administrator granted consent");
        return Outcome(vec![
            ("status", "admin_consent_granted".into()),
            ("provider", provider.as_str().into()),
        ]);
    }
    Outcome::error(provider, "missing_code")
}

/// The user's consent came back: exchange, check and keep the grant pending.
async fn connect_return(
    state: &AdminState,
    pending: &OAuthState,
    q: &CallbackQuery,
) -> Result<Outcome, ApiError> {
    let org = pending.organization_id.as_str();
    let provider = pending.provider;
    if let Some(error) = q.error.as_deref() {
        let description = q.error_description.as_deref().unwrap_or_default();
        let refusal = refusal(error, description);
        tracing::info!(org.id = org, %provider, error = oauth_error_code(error), aadsts = aadsts(description), outcome = %refusal, "provider refused the authorization");
        return Ok(Outcome::error(provider, &refusal));
    }
    let Some(code) = q.code.as_deref().filter(|c| !c.is_empty()) else {
        return Ok(Outcome::error(provider, "missing_code"));
    };
    let service = state.services.senders.tokens.service();
    let grant = match service
        .exchange_code(provider, code, &pending.pkce_verifier)
        .await
    {
        Ok(g) => g,
        Err(e) => {
            tracing::warn!(org.id = org, %provider, error = %e, "code exchange failed");
            return Ok(Outcome::error(provider, "token_exchange_failed"));
        }
    };
    let Some(refresh_token) = grant.refresh_token.clone() else {
        tracing::warn!(org.id = org, %provider, "no refresh token granted");
        return Ok(Outcome::error(provider, "no_refresh_token"));
    };
    // Google's consent screen lets the user untick scopes; the response says what
    // was granted. Without the send scope the grant is of no use: keep nothing.
    let missing = scopes::missing(service.requested_scopes(provider), grant.scopes.as_deref());
    if !missing.is_empty() {
        let labels: Vec<String> = missing.iter().map(|s| scopes::label(provider, s)).collect();
        tracing::info!(org.id = org, %provider, missing = %labels.join(","), "consent given without a required permission; nothing stored");
        revoke(state, provider, &refresh_token).await;
        return Ok(Outcome::error(provider, "scope_not_granted").with("missing", labels.join(",")));
    }
    let account = match identify(state, provider, &grant).await {
        Ok(account) => account,
        Err(error) => {
            revoke(state, provider, &refresh_token).await;
            let outcome = Outcome::error(provider, error);
            return Ok(if error == "scope_not_granted" {
                outcome.with("missing", "User.Read".into())
            } else {
                outcome
            });
        }
    };
    let connection = random_token();
    let expires_at = state
        .services
        .store
        .create_pending_connection(
            &connection_hash(&connection),
            &NewConnection {
                organization_id: org.to_owned(),
                provider,
                account_email: account.email,
                account_id: account.id,
                account_tenant: account.tenant,
                refresh_token,
                access_token: Some((grant.access_token.clone(), grant.expires_at)),
                granted_scopes: grant.scopes.clone(),
            },
            state.config.connection_ttl,
            pending.portal_session.as_deref(),
        )
        .await?;
    tracing::info!(org.id = org, %provider, %expires_at, "consent received; waiting for the host application's confirmation");
    Ok(Outcome(vec![
        ("status", "connected".into()),
        ("provider", provider.as_str().into()),
        ("connection", connection),
    ]))
}

/// Who granted: the account's address and stable ids.
struct Account {
    email: String,
    id: Option<String>,
    tenant: Option<String>,
}

/// Identifies the account behind a grant, or names why it cannot be used.
async fn identify(
    state: &AdminState,
    provider: ProviderKind,
    grant: &TokenGrant,
) -> Result<Account, &'static str> {
    let service = state.services.senders.tokens.service();
    let claims = grant
        .id_token
        .as_deref()
        .and_then(id_token_claims)
        .filter(|c| {
            let ours = service
                .client_id(provider)
                .is_some_and(|id| c.issued_for(id));
            if !ours {
                tracing::warn!(%provider, "ID token not issued for this client; ignored");
            }
            ours
        });
    match provider {
        ProviderKind::Microsoft => {
            let tid = claims.as_ref().and_then(|c| c.tid.clone());
            if tid.as_deref() == Some(MICROSOFT_CONSUMER_TENANT) {
                // A personal Microsoft account: not a Microsoft 365 organization.
                return Err("personal_account_not_supported");
            }
            let me = match state.services.senders.graph.me(&grant.access_token).await {
                Ok(me) => me,
                Err(e) => {
                    tracing::warn!(%provider, status = e.provider_status, code = e.provider_code.as_deref(), "GET /me failed");
                    return Err(if e.provider_status == Some(403) {
                        "scope_not_granted"
                    } else {
                        "account_unknown"
                    });
                }
            };
            // `mail` is null for a user without an Exchange Online mailbox; the
            // user principal name is then no address to send from.
            let Some(mail) = me.mail.filter(|m| EmailAddress::parse(m).is_ok()) else {
                return Err("no_mailbox");
            };
            Ok(Account {
                email: mail,
                id: Some(me.id),
                tenant: tid,
            })
        }
        _ => {
            let Some(claims) = claims else {
                return Err("account_unknown");
            };
            let email = match (&claims.email, claims.email_verified) {
                (Some(e), Some(true) | None) if EmailAddress::parse(e).is_ok() => e.clone(),
                _ => return Err("account_unknown"),
            };
            Ok(Account {
                email,
                id: claims.sub,
                tenant: claims.hd,
            })
        }
    }
}

/// Revokes a grant at Google (RFC 7009; a grant already gone answers 400).
/// Microsoft has no per-grant revocation endpoint. Returns whether it was revoked.
pub(crate) async fn revoke(
    state: &AdminState,
    provider: ProviderKind,
    token: &SecretString,
) -> bool {
    if provider != ProviderKind::Google {
        return false;
    }
    let answer = state
        .http
        .post(state.config.google_revoke_url.clone())
        .form(&[("token", token.expose_secret())])
        .send()
        .await;
    let revoked = matches!(&answer, Ok(r) if r.status().is_success());
    if !revoked {
        tracing::warn!(
            status = answer.as_ref().ok().map(|r| r.status().as_u16()),
            "Google did not confirm the revocation"
        );
    }
    revoked
}

/// Confirms a consent received by the callback: from now on the organization's
/// integration uses this grant.
#[utoipa::path(post, path = "/v1/organizations/{org}/integration/confirm", tag = "integration",
    params(("org" = String, Path, description = "Organization id")),
    request_body = ConfirmRequest,
    responses((status = 200, body = ConfirmResponse),
              (status = 401, body = ErrorBody),
              (status = 404, body = ErrorBody, description = "connection_unknown: never issued for this organization"),
              (status = 409, body = ErrorBody, description = "connection_used: already confirmed"),
              (status = 410, body = ErrorBody, description = "connection_expired: connect again")),
    security(("admin_token" = [])))]
pub async fn confirm(
    State(state): State<AdminState>,
    OrgId(org): OrgId,
    ApiJson(req): ApiJson<ConfirmRequest>,
) -> Result<Json<ConfirmResponse>, ApiError> {
    Ok(Json(
        confirm_connection(&state, &org, req.connection.trim(), None).await?,
    ))
}

/// Confirms a pending consent of `org` and stores its grant (the API's confirm
/// and the portal's return). `portal_session`: the portal session the connect
/// was started in, which alone may confirm it; `None` for the admin API.
pub(crate) async fn confirm_connection(
    state: &AdminState,
    org: &str,
    connection: &str,
    portal_session: Option<&[u8]>,
) -> Result<ConfirmResponse, ApiError> {
    let store = &state.services.store;
    let org = org.to_owned();
    if connection.is_empty() || connection.len() > 200 {
        return Err(ApiError::invalid("connection is missing or malformed"));
    }
    let grant = match store
        .confirm_pending_connection(&org, &connection_hash(connection), portal_session)
        .await?
    {
        ConfirmLookup::Valid(grant) => grant,
        ConfirmLookup::Unknown => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                ApiErrorCode::ConnectionUnknown,
                "no such pending connection for this organization",
            ));
        }
        ConfirmLookup::Used => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                ApiErrorCode::ConnectionUsed,
                "this connection was already confirmed",
            ));
        }
        ConfirmLookup::Expired => {
            return Err(ApiError::new(
                StatusCode::GONE,
                ApiErrorCode::ConnectionExpired,
                "the consent was not confirmed in time: connect again",
            ));
        }
    };
    let previous = store.integration(&org).await?;
    let account_changed = previous
        .as_ref()
        .is_some_and(|p| changed_account(p, &grant));
    let provider = grant.provider;
    let saved = store.save_connection(&grant).await?;
    // The other caches learn of it by NOTIFY; this process's token cache must not
    // keep a token of the previous grant meanwhile.
    state.services.senders.tokens.forget(&org);
    tracing::info!(org.id = %org, %provider, account_changed, "provider connected (confirmed by the host application)");

    // A reconnect of an organization whose sender is saved re-runs the sender's
    // check and test: same account or not, the saved sender must still work.
    let reconnect = previous
        .as_ref()
        .is_some_and(|i| i.provider == provider && i.sender_email.is_some());
    let (status, test) = match (reconnect, saved.sender_email.as_deref()) {
        (true, Some(sender)) => {
            let outcome = crate::sender::retest_saved_sender(state, &org, &saved, sender).await?;
            let status = if outcome.status == crate::sender::TestStatus::Sent {
                ConfirmStatus::Active
            } else {
                ConfirmStatus::TestFailed
            };
            (status, Some(outcome))
        }
        _ => (ConfirmStatus::Connected, None),
    };
    let integration = store.integration(&org).await?;
    Ok(ConfirmResponse {
        status,
        account_changed,
        test,
        integration: view_with_pause(store, &org, integration.as_ref()).await?,
    })
}

fn changed_account(previous: &Integration, grant: &NewConnection) -> bool {
    if previous.provider != grant.provider {
        return true;
    }
    match (&previous.account_id, &grant.account_id) {
        (Some(a), Some(b)) => a != b || previous.account_tenant != grant.account_tenant,
        _ => !previous
            .account_email
            .as_deref()
            .is_some_and(|a| a.eq_ignore_ascii_case(&grant.account_email)),
    }
}

/// Removes unconfirmed grants past their expiry, revoking them at Google.
/// Returns how many were removed.
pub async fn expire_pending_connections(state: &AdminState) -> usize {
    let expired = match state
        .services
        .store
        .take_expired_pending_connections(100)
        .await
    {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(error = %e, "could not expire pending connections");
            return 0;
        }
    };
    for e in &expired {
        let revoked = match &e.refresh_token {
            Some(token) => revoke(state, e.provider, token).await,
            None => false,
        };
        tracing::info!(org.id = %e.organization_id, provider = %e.provider, revoked, "unconfirmed consent expired");
    }
    expired.len()
}

/// Expires unconfirmed grants every `every` until the task is dropped.
pub async fn run_upkeep(state: AdminState, every: Duration) {
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(50)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        while expire_pending_connections(&state).await == 100 {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_read_from_the_aadsts_number() {
        assert_eq!(
            refusal(
                "access_denied",
                "AADSTS90094: The grant requires admin permission."
            ),
            "admin_approval_required"
        );
        assert_eq!(
            refusal(
                "consent_required",
                "AADSTS65001: The user or administrator has not consented"
            ),
            "admin_approval_required"
        );
        assert_eq!(
            refusal("consent_required", "AADSTS65004: User declined to consent"),
            "access_denied"
        );
        assert_eq!(refusal("access_denied", ""), "access_denied");
        assert_eq!(
            refusal("admin_policy_enforced", ""),
            "admin_policy_enforced"
        );
        assert_eq!(refusal("Bad<Code>", ""), "provider_error");
    }
}
