#![doc = include_str!("../README.md")]

mod connect;
mod error;
mod extract;
mod integration;
mod listener;
mod openapi;
mod portal;
mod recipients;
mod sender;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, header};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post, put};
use mail_dispatch_worker::Services;
use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq as _;
use tracing::Instrument as _;
use url::Url;
use utoipa::OpenApi as _;

pub use connect::{expire_pending_connections, run_upkeep};
pub use error::{ApiError, ApiErrorCode, ErrorBody};
pub use integration::{
    IntegrationView, SendingPause, view as integration_view,
    view_with_pause as integration_view_with_pause,
};
pub use listener::{ConnectionLimits, GuardedListener, GuardedStream};
pub use openapi::ApiDoc;
pub use portal::{PORTAL_LINK_TTL, PORTAL_SESSION_TTL, TEST_SEND_WINDOW, TEST_SENDS_PER_WINDOW};
pub use recipients::{RecipientsSee, RewriteReason};

/// Largest request body accepted (the API only takes small JSON objects).
pub const MAX_BODY_BYTES: usize = 16 * 1024;
/// How long an authorization request (`state`) stays valid.
pub const STATE_TTL: Duration = Duration::from_secs(600);
/// How long a consent received by the callback waits for the host application's confirmation.
pub const CONNECTION_TTL: Duration = Duration::from_secs(900);

/// Settings of the admin API.
#[derive(Clone, Debug)]
pub struct AdminConfig {
    pub admin_token: SecretString,
    /// Origins (`scheme://host[:port]`) that `return_to` may point at.
    pub return_origins: Vec<url::Origin>,
    pub google_revoke_url: Url,
    /// Accept a Gmail sender that is one of the account's verified aliases.
    pub google_check_aliases: bool,
    pub state_ttl: Duration,
    /// How long a consent waits for `POST …/integration/confirm`.
    pub connection_ttl: Duration,
    /// `Mail.Send.Shared` is requested: a sender may be another mailbox.
    pub microsoft_shared_mailboxes: bool,
    /// Platform name in test messages, and in the portal unless the host
    /// application names itself.
    pub product_name: String,
    /// `MAIL_DISPATCH_PUBLIC_URL`: the portal's links live under it.
    pub public_url: Url,
    /// How long a portal session lasts once its link is opened.
    pub portal_session_ttl: Duration,
}

/// Shared by every handler: the services the admin API uses, never the worker's.
#[derive(Clone)]
pub struct AdminState {
    pub services: Arc<Services>,
    pub config: Arc<AdminConfig>,
    pub http: reqwest::Client,
    /// The hosted settings page's templates and response policy.
    portal: Arc<portal::Portal>,
}

impl AdminState {
    pub fn new(services: Arc<Services>, config: AdminConfig) -> Self {
        let service = services.senders.tokens.service();
        let origins: Vec<url::Origin> = [
            mail_dispatch_domain::ProviderKind::Microsoft,
            mail_dispatch_domain::ProviderKind::Google,
        ]
        .into_iter()
        .filter_map(|p| service.authorize_origin(p))
        .collect();
        AdminState {
            services,
            config: Arc::new(config),
            http: mail_dispatch_providers::oauth_http_client(Duration::from_secs(15)),
            portal: Arc::new(portal::Portal::new(&origins)),
        }
    }
}

/// The admin API.
pub fn app(state: AdminState) -> Router {
    let organizations = Router::new()
        .route(
            "/{org}/integration",
            get(integration::get_integration).delete(integration::delete_integration),
        )
        .route("/{org}/integration/authorize", post(connect::authorize))
        .route("/{org}/integration/confirm", post(connect::confirm))
        .route("/{org}/integration/sender", put(sender::put_sender))
        .route(
            "/{org}/portal-sessions",
            post(portal::create_portal_session),
        )
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_bearer,
        ));
    let portal = Router::new()
        .route("/start", get(portal::start))
        .route("/", get(portal::show))
        .route("/connect", post(portal::connect))
        .route("/return", get(portal::back))
        .route("/sender", post(portal::save_sender))
        .route("/disconnect", post(portal::disconnect))
        .route("/style.css", get(portal::style))
        .route("/theme.css", get(portal::theme))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            portal::security_headers,
        ));
    Router::new()
        .nest("/v1/organizations", organizations)
        .nest("/portal", portal)
        // The callback's pages must not be framed either.
        .route(
            "/v1/oauth/callback",
            get(connect::callback).layer(middleware::map_response(deny_framing)),
        )
        .route(
            "/v1/openapi.json",
            get(|| async { axum::Json(ApiDoc::openapi()) }),
        )
        .fallback(|| async {
            ApiError::new(
                axum::http::StatusCode::NOT_FOUND,
                ApiErrorCode::NotFound,
                "no such route",
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(request_span))
        .with_state(state)
}

/// `X-Frame-Options: DENY` and `frame-ancestors 'none'`.
async fn deny_framing(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::X_FRAME_OPTIONS,
        axum::http::HeaderValue::from_static("DENY"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        axum::http::HeaderValue::from_static("default-src 'none'; frame-ancestors 'none'"),
    );
    response
}

/// A span per request (method, route, organization), closed with one line that
/// says how it ended. The organization id comes from the path; nothing else of
/// the request (no query: the callback's carries codes) is recorded.
async fn request_span(request: Request, next: Next) -> Response {
    let org = request
        .uri()
        .path()
        .strip_prefix("/v1/organizations/")
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_default()
        .to_owned();
    // The route, not the raw path: organization ids stay in their own field.
    let path = request.uri().path();
    let route = if org.is_empty() {
        path.to_owned()
    } else {
        path.replacen(&format!("/{org}"), "/{org}", 1)
    };
    let span = tracing::info_span!(
        "admin_request",
        method = %request.method(),
        route = %route,
        org.id = %org,
    );
    let started = std::time::Instant::now();
    async move {
        let response = next.run(request).await;
        tracing::info!(
            status = response.status().as_u16(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "admin request"
        );
        response
    }
    .instrument(span)
    .await
}

/// `Authorization: Bearer <admin token>`, compared in constant time.
async fn require_bearer(
    State(state): State<AdminState>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        // The scheme is case-insensitive (RFC 9110 §11.1).
        .and_then(|v| {
            v.get(..7)
                .filter(|scheme| scheme.eq_ignore_ascii_case("bearer "))
                .map(|_| &v[7..])
        })
        .unwrap_or_default();
    let expected = state.config.admin_token.expose_secret().as_bytes();
    let ok = !expected.is_empty() && bool::from(presented.as_bytes().ct_eq(expected));
    if !ok {
        let mut response = axum::response::IntoResponse::into_response(ApiError::new(
            axum::http::StatusCode::UNAUTHORIZED,
            ApiErrorCode::Unauthorized,
            "missing or wrong bearer token",
        ));
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            axum::http::HeaderValue::from_static("Bearer"),
        );
        return Ok(response);
    }
    Ok(next.run(request).await)
}
