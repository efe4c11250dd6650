//! The handlers, their request and response shapes, and the OpenAPI document.

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use base64::Engine as _;
use chrono::{DateTime, Utc};
use mail_dispatch_domain::address::display_name_problem;
use mail_dispatch_domain::{
    EmailAddress, ErrorCode, JobError, Mailbox, OutgoingMessage, ProviderKind,
};
use mail_dispatch_providers::oauth::id_token_email;
use mail_dispatch_store::{Fallback, Integration, NewConnection, StateLookup};
use mail_dispatch_worker::sender::InProcessRetry;
use rand::RngCore as _;
use secrecy::ExposeSecret as _;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, OpenApi, ToSchema};

use crate::AdminState;
use crate::error::{ApiError, ErrorBody};
use crate::extract::{ApiJson, OrgId};

#[derive(OpenApi)]
#[openapi(
    info(title = "mail-dispatch admin API", description = "Connect an organization's Microsoft 365 or Google Workspace account, save and test its sender, disconnect it."),
    paths(authorize, callback, put_sender, get_integration, delete_integration),
    components(schemas(AuthorizeRequest, AuthorizeResponse, SenderRequest, TestOutcome, IntegrationView, SenderView, ErrorBody, DisconnectResponse, TestError)),
    modifiers(&BearerAuth),
    tags((name = "integration", description = "An organization's mail provider"))
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "admin_token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

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
    /// The `state` stops working at this instant.
    pub expires_at: DateTime<Utc>,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct SenderRequest {
    /// The address notifications are sent from.
    pub email: String,
    /// The display name (no `@`, CR or LF).
    pub name: Option<String>,
    /// Where the test message goes; default: the connected account.
    pub test_recipient: Option<String>,
    /// `none` (default) or `platform_sender`: what happens if the grant stops working.
    pub fallback: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TestError {
    pub code: String,
    pub message: String,
    pub provider_status: Option<u16>,
    pub provider_code: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TestOutcome {
    /// `sent` (the integration is now active) or `failed`.
    pub status: String,
    pub provider_message_id: Option<String>,
    pub error: Option<TestError>,
    pub integration: IntegrationView,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SenderView {
    pub email: String,
    pub name: Option<String>,
}

/// An integration as the host application sees it: never a token.
#[derive(Debug, Serialize, ToSchema)]
pub struct IntegrationView {
    pub organization_id: String,
    /// `microsoft`, `google`, or null when not configured.
    pub provider: Option<String>,
    /// `not_configured`, `pending_sender`, `active` or `needs_reauth`.
    pub status: String,
    pub account_email: Option<String>,
    pub sender: Option<SenderView>,
    /// `none` or `platform_sender`.
    pub fallback: Option<String>,
    pub connected_at: Option<DateTime<Utc>>,
    pub last_test_at: Option<DateTime<Utc>>,
    #[schema(value_type = Option<Object>)]
    pub last_test: Option<serde_json::Value>,
    pub last_error: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DisconnectResponse {
    /// Always `not_configured` afterwards: the platform sender is used.
    pub status: String,
    /// Whether an integration was there to delete.
    pub deleted: bool,
    /// Whether the provider revoked the grant (Google); Microsoft offers no per-grant revocation.
    pub revoked: bool,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CallbackQuery {
    pub code: Option<String>,
    pub state: Option<String>,
    pub error: Option<String>,
    pub error_description: Option<String>,
}

fn view(org: &str, i: Option<&Integration>) -> IntegrationView {
    match i {
        None => IntegrationView {
            organization_id: org.to_owned(),
            provider: None,
            status: "not_configured".into(),
            account_email: None,
            sender: None,
            fallback: None,
            connected_at: None,
            last_test_at: None,
            last_test: None,
            last_error: None,
        },
        Some(i) => IntegrationView {
            organization_id: i.organization_id.clone(),
            provider: Some(i.provider.as_str().into()),
            status: i.status.as_str().into(),
            account_email: i.account_email.clone(),
            sender: i.sender_email.as_ref().map(|email| SenderView {
                email: email.clone(),
                name: i.sender_name.clone(),
            }),
            fallback: Some(i.fallback.as_str().into()),
            connected_at: Some(i.connected_at),
            last_test_at: i.last_test_at,
            last_test: i.last_test.clone(),
            last_error: i.last_error.clone(),
        },
    }
}

fn parse_provider(raw: &str) -> Result<ProviderKind, ApiError> {
    match ProviderKind::parse(raw) {
        Some(p @ (ProviderKind::Microsoft | ProviderKind::Google)) => Ok(p),
        _ => Err(ApiError::invalid(
            "provider must be `microsoft` or `google`",
        )),
    }
}

fn random_state() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
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
            "return_to_not_allowed",
            "return_to is not on an allowed origin (MAIL_DISPATCH_RETURN_ORIGINS)",
        ));
    }
    let service = state.dispatcher.senders.tokens.service();
    let oauth_state = random_state();
    let (url, verifier) = service.authorize_url(provider, &oauth_state).map_err(|_| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "provider_not_configured",
            format!("{provider} is not configured on this deployment"),
        )
    })?;
    let expires_at = state
        .dispatcher
        .store
        .create_oauth_state(
            &oauth_state,
            &org,
            provider,
            &verifier,
            return_to.as_str(),
            state.config.state_ttl,
        )
        .await?;
    tracing::info!(org.id = %org, %provider, "authorization started");
    Ok(Json(AuthorizeResponse {
        authorization_url: url.to_string(),
        expires_at,
    }))
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

/// Where the admin's browser lands after the provider's consent page.
#[utoipa::path(get, path = "/v1/oauth/callback", tag = "integration", params(CallbackQuery),
    responses((status = 303, description = "Redirect to return_to with `status` (connected, active, test_failed, error) and, on error, `error`"),
              (status = 400, description = "Unknown state: nowhere safe to redirect to")))]
pub async fn callback(State(state): State<AdminState>, Query(q): Query<CallbackQuery>) -> Response {
    let store = &state.dispatcher.store;
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
    let org = pending.organization_id.as_str();
    let provider = pending.provider;
    let ret = pending.return_to.as_str();
    let p = provider.as_str();
    if let Some(error) = q.error.as_deref() {
        tracing::info!(
            org.id = org,
            %provider,
            error = oauth_error_code(error),
            description = q.error_description.as_deref().unwrap_or_default(),
            "provider refused the authorization"
        );
        return back_to(
            ret,
            &[
                ("status", "error"),
                ("error", oauth_error_code(error)),
                ("provider", p),
            ],
        );
    }
    let Some(code) = q.code.as_deref().filter(|c| !c.is_empty()) else {
        return back_to(
            ret,
            &[
                ("status", "error"),
                ("error", "missing_code"),
                ("provider", p),
            ],
        );
    };
    let service = state.dispatcher.senders.tokens.service();
    let grant = match service
        .exchange_code(provider, code, &pending.pkce_verifier)
        .await
    {
        Ok(g) => g,
        Err(e) => {
            tracing::warn!(org.id = org, %provider, error = %e, "code exchange failed");
            return back_to(
                ret,
                &[
                    ("status", "error"),
                    ("error", "token_exchange_failed"),
                    ("provider", p),
                ],
            );
        }
    };
    let Some(refresh_token) = grant.refresh_token.clone() else {
        tracing::warn!(org.id = org, %provider, "no refresh token granted");
        return back_to(
            ret,
            &[
                ("status", "error"),
                ("error", "no_refresh_token"),
                ("provider", p),
            ],
        );
    };
    let account = match provider {
        ProviderKind::Microsoft => state
            .dispatcher
            .senders
            .graph
            .account_email(&grant.access_token)
            .await
            .ok(),
        _ => grant.id_token.as_deref().and_then(id_token_email),
    };
    let Some(account) = account else {
        return back_to(
            ret,
            &[
                ("status", "error"),
                ("error", "account_unknown"),
                ("provider", p),
            ],
        );
    };
    let previous = match store.integration(org).await {
        Ok(p) => p,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let saved = store
        .save_connection(&NewConnection {
            organization_id: org.to_owned(),
            provider,
            account_email: account.clone(),
            refresh_token,
            access_token: Some((grant.access_token.clone(), grant.expires_at)),
            granted_scopes: grant.scopes.clone(),
        })
        .await;
    let saved = match saved {
        Ok(s) => s,
        Err(e) => return ApiError::from(e).into_response(),
    };
    // The other caches learn of it by NOTIFY; this process's token cache must not
    // keep a token of the previous grant meanwhile.
    state.dispatcher.senders.tokens.forget(org);
    tracing::info!(org.id = org, %provider, "provider connected");

    // A reconnect of an organization whose sender is saved re-runs the test.
    let reconnect = previous
        .as_ref()
        .is_some_and(|i| i.provider == provider && i.sender_email.is_some());
    if let (true, Some(email), Some(name)) = (
        reconnect,
        saved.sender_email.clone(),
        Some(saved.sender_name.clone()),
    ) {
        let Ok(sender_email) = EmailAddress::parse(&email) else {
            return back_to(ret, &[("status", "connected"), ("provider", p)]);
        };
        let sender = Mailbox::new(sender_email, name);
        let recipient = EmailAddress::parse(&account).map(|a| Mailbox::new(a, None));
        let Ok(recipient) = recipient else {
            return back_to(ret, &[("status", "connected"), ("provider", p)]);
        };
        return match test_send(&state, org, provider, &sender, &recipient, saved.fallback).await {
            Ok((outcome, _)) if outcome.status == "sent" => {
                back_to(ret, &[("status", "active"), ("provider", p)])
            }
            Ok((outcome, _)) => {
                let code = outcome.error.map(|e| e.code).unwrap_or_default();
                back_to(
                    ret,
                    &[("status", "test_failed"), ("error", &code), ("provider", p)],
                )
            }
            Err(e) => e.into_response(),
        };
    }
    back_to(ret, &[("status", "connected"), ("provider", p)])
}

/// The test message: a small notification saying what was configured.
fn test_message(
    state: &AdminState,
    org: &str,
    provider: ProviderKind,
    sender: &Mailbox,
    to: &Mailbox,
) -> OutgoingMessage {
    let provider_name = match provider {
        ProviderKind::Microsoft => "Microsoft 365",
        ProviderKind::Google => "Google Workspace",
        ProviderKind::Default => "the platform sender",
    };
    let from = match &sender.name {
        Some(name) => format!("{name} <{}>", sender.email),
        None => sender.email.to_string(),
    };
    let product = &state.config.product_name;
    let text = format!(
        "This is a test message from {product}.\n\n\
         Notifications of organization {org} will be sent through {provider_name}, from {from}.\n\n\
         No action is needed. If you did not expect this message, tell your {product} administrator."
    );
    let html = format!(
        "<p>This is a test message from {product}.</p><p>Notifications of organization <b>{org}</b> will be sent \
         through <b>{provider_name}</b>, from <b>{from}</b>.</p><p>No action is needed.</p>",
        org = html_escape(org),
        from = html_escape(&from),
    );
    OutgoingMessage {
        from: sender.clone(),
        to: vec![to.clone()],
        cc: vec![],
        bcc: vec![],
        reply_to: None,
        subject: format!("{product}: {provider_name} is connected"),
        text: Some(text),
        html: Some(html),
        attachments: vec![],
        headers: [("X-Mail-Dispatch-Test".to_owned(), "1".to_owned())].into(),
        message_id: Some(format!("test-{}@{}", uuid_like(), sender.email.domain())),
    }
}

fn uuid_like() -> String {
    let mut b = [0u8; 16];
    rand::rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Sends the test through the worker's own send path and records the outcome;
/// the integration becomes active (with this sender) only if it was sent.
async fn test_send(
    state: &AdminState,
    org: &str,
    provider: ProviderKind,
    sender: &Mailbox,
    to: &Mailbox,
    fallback: Fallback,
) -> Result<(TestOutcome, bool), ApiError> {
    let store = &state.dispatcher.store;
    let message = test_message(state, org, provider, sender, to);
    let retry = InProcessRetry {
        attempts: 2,
        max_wait: std::time::Duration::from_secs(2),
        backoff: mail_dispatch_domain::Backoff {
            base: std::time::Duration::from_millis(200),
            max: std::time::Duration::from_secs(2),
        },
    };
    let (outcome, _, _) = state
        .dispatcher
        .senders
        .send(provider, org, &message, retry)
        .await;
    let (status, message_id, error) = match outcome {
        Ok(accepted) => ("sent", accepted.provider_message_id, None),
        Err(mail_dispatch_worker::SendFailure::Send(e)) => {
            ("failed", None, Some(e.to_job_error(e.final_code())))
        }
        Err(mail_dispatch_worker::SendFailure::Revoked { reason, .. }) => (
            "failed",
            None,
            Some(JobError::new(
                ErrorCode::AuthRevoked,
                format!("the provider refused the grant: {reason}"),
            )),
        ),
        Err(mail_dispatch_worker::SendFailure::Store(e)) => return Err(ApiError::internal(e)),
    };
    let sent = status == "sent";
    if let Some(e) = &error
        && e.code == ErrorCode::AuthRevoked
    {
        let _ = store
            .mark_needs_reauth(org, e.provider_code.as_deref().unwrap_or("access refused"))
            .await;
    }
    if sent {
        store
            .save_sender(org, sender.email.as_str(), sender.name.as_deref(), fallback)
            .await?;
    }
    let record = serde_json::json!({
        "status": status,
        "sender": {"email": sender.email.as_str(), "name": sender.name},
        "provider_message_id": message_id,
        "error": error,
    });
    let integration = store.record_test(org, &record, sent).await?;
    state.dispatcher.senders.tokens.forget(org);
    tracing::info!(org.id = org, %provider, status, "sender test");
    Ok((
        TestOutcome {
            status: status.into(),
            provider_message_id: message_id,
            error: error.map(|e| TestError {
                code: e.code.as_str().into(),
                message: e.message,
                provider_status: e.provider_status,
                provider_code: e.provider_code,
            }),
            integration: view(org, integration.as_ref()),
        },
        sent,
    ))
}

/// Saves the sender and sends a test message through the provider.
#[utoipa::path(put, path = "/v1/organizations/{org}/integration/sender", tag = "integration",
    params(("org" = String, Path, description = "Organization id")),
    request_body = SenderRequest,
    responses((status = 200, body = TestOutcome, description = "The test outcome: `sent` (now active) or `failed`"),
              (status = 401, body = ErrorBody), (status = 409, body = ErrorBody, description = "not_configured: connect a provider first"),
              (status = 422, body = ErrorBody, description = "invalid_sender, sender_not_allowed, invalid_request")),
    security(("admin_token" = [])))]
pub async fn put_sender(
    State(state): State<AdminState>,
    OrgId(org): OrgId,
    ApiJson(req): ApiJson<SenderRequest>,
) -> Result<Json<TestOutcome>, ApiError> {
    let store = &state.dispatcher.store;
    let Some(integration) = store.integration(&org).await? else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_configured",
            "connect a provider before saving a sender",
        ));
    };
    let email = EmailAddress::parse(req.email.trim()).map_err(|_| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_sender",
            "email is not a valid address",
        )
    })?;
    let name = req.name.as_deref().map(str::trim).filter(|n| !n.is_empty());
    if let Some(name) = name {
        if name.contains('@') {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_sender",
                "the sender name must not contain `@` (Microsoft refuses it with ErrorSendAsDenied)",
            ));
        }
        if let Some(problem) = display_name_problem(name) {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_sender",
                format!("the sender name {problem}"),
            ));
        }
    }
    let fallback = match req.fallback.as_deref() {
        None => Fallback::None,
        Some(raw) => Fallback::parse(raw)
            .ok_or_else(|| ApiError::invalid("fallback must be `none` or `platform_sender`"))?,
    };
    let recipient = match req.test_recipient.as_deref() {
        Some(raw) => EmailAddress::parse(raw.trim())
            .map_err(|_| ApiError::invalid("test_recipient is not a valid address"))?,
        None => integration
            .account_email
            .as_deref()
            .and_then(|a| EmailAddress::parse(a).ok())
            .ok_or_else(|| ApiError::invalid("give a test_recipient"))?,
    };
    if integration.provider == ProviderKind::Google {
        check_google_sender(&state, &org, &integration, &email).await?;
    }
    let sender = Mailbox::new(email, name.map(str::to_owned));
    let (outcome, _) = test_send(
        &state,
        &org,
        integration.provider,
        &sender,
        &Mailbox::new(recipient, None),
        fallback,
    )
    .await?;
    Ok(Json(outcome))
}

/// Gmail silently rewrites a From that is not the account or a verified alias:
/// refuse such a sender instead of letting the test "succeed" from another address.
async fn check_google_sender(
    state: &AdminState,
    org: &str,
    integration: &Integration,
    email: &EmailAddress,
) -> Result<(), ApiError> {
    let account = integration.account_email.as_deref().unwrap_or_default();
    if account.eq_ignore_ascii_case(email.as_str()) {
        return Ok(());
    }
    let not_allowed = |why: &str| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "sender_not_allowed",
            format!("with Google, the sender must be {why}"),
        )
    };
    if !state.config.google_check_aliases {
        return Err(not_allowed("the connected account's own address"));
    }
    let senders = &state.dispatcher.senders;
    let token = senders
        .tokens
        .access_token(org, ProviderKind::Google, None)
        .await
        .map_err(ApiError::internal)?;
    let aliases = senders.gmail.send_as_addresses(&token).await.map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "sender_not_allowed",
            format!("could not read the account's aliases: {e}"),
        )
    })?;
    if aliases
        .iter()
        .any(|a| a.eq_ignore_ascii_case(email.as_str()))
    {
        Ok(())
    } else {
        Err(not_allowed(
            "the connected account's address or one of its verified send-as aliases",
        ))
    }
}

/// The organization's integration (never a token).
#[utoipa::path(get, path = "/v1/organizations/{org}/integration", tag = "integration",
    params(("org" = String, Path, description = "Organization id")),
    responses((status = 200, body = IntegrationView), (status = 401, body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn get_integration(
    State(state): State<AdminState>,
    OrgId(org): OrgId,
) -> Result<Json<IntegrationView>, ApiError> {
    let i = state.dispatcher.store.integration(&org).await?;
    Ok(Json(view(&org, i.as_ref())))
}

/// Disconnects: revokes what the provider lets revoke, deletes the tokens.
#[utoipa::path(delete, path = "/v1/organizations/{org}/integration", tag = "integration",
    params(("org" = String, Path, description = "Organization id")),
    responses((status = 200, body = DisconnectResponse), (status = 401, body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn delete_integration(
    State(state): State<AdminState>,
    OrgId(org): OrgId,
) -> Result<Json<DisconnectResponse>, ApiError> {
    let deleted = state.dispatcher.store.delete_integration(&org).await?;
    state.dispatcher.senders.tokens.forget(&org);
    let mut revoked = false;
    if let Some((ProviderKind::Google, Some(refresh))) = &deleted {
        // RFC 7009 at Google's revoke endpoint; a grant already gone answers 400.
        let answer = state
            .http
            .post(state.config.google_revoke_url.clone())
            .form(&[("token", refresh.expose_secret())])
            .send()
            .await;
        revoked = matches!(&answer, Ok(r) if r.status().is_success());
        if !revoked {
            tracing::warn!(org.id = %org, status = answer.as_ref().ok().map(|r| r.status().as_u16()), "Google did not confirm the revocation");
        }
    }
    tracing::info!(org.id = %org, deleted = deleted.is_some(), revoked, "integration disconnected");
    Ok(Json(DisconnectResponse {
        status: "not_configured".into(),
        deleted: deleted.is_some(),
        revoked,
    }))
}
