//! OAuth 2.0 with the `oauth2` crate: the refresh-token grant for the worker,
//! and (for the connect flow) authorization URLs with PKCE and the code exchange.
//!
//! The HTTP client used here never follows redirects (RFC 6749 §10.5 / the
//! `oauth2` crate's advice: a token endpoint that redirects is an attack).

use std::time::Duration;

use chrono::{DateTime, Utc};
use mail_dispatch_domain::ProviderKind;
use oauth2::basic::{
    BasicErrorResponse, BasicErrorResponseType, BasicRequestTokenError,
    BasicRevocationErrorResponse, BasicTokenIntrospectionResponse, BasicTokenType,
};
use oauth2::{
    AuthType, AuthUrl, AuthorizationCode, ClientId, ClientSecret, CsrfToken, EndpointNotSet,
    EndpointSet, ExtraTokenFields, PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, RefreshToken,
    Scope, StandardRevocableToken, StandardTokenResponse, TokenResponse, TokenUrl,
};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use url::Url;

/// Lifetime assumed when a token response carries no `expires_in`.
const DEFAULT_EXPIRES_IN: Duration = Duration::from_secs(3600);

/// OpenID Connect adds `id_token` to the token response (Google puts the
/// account's address in it); the `oauth2` crate's basic response drops it.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct IdTokenFields {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_token: Option<String>,
}

impl ExtraTokenFields for IdTokenFields {}

type OidcTokenResponse = StandardTokenResponse<IdTokenFields, BasicTokenType>;

type ConfiguredClient = oauth2::Client<
    BasicErrorResponse,
    OidcTokenResponse,
    BasicTokenIntrospectionResponse,
    StandardRevocableToken,
    BasicRevocationErrorResponse,
    EndpointSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointSet,
>;

/// One provider's OAuth application.
#[derive(Clone, Debug)]
pub struct OAuthApp {
    pub client_id: String,
    pub client_secret: Option<SecretString>,
    pub auth_url: Url,
    pub token_url: Url,
    pub scopes: Vec<String>,
    /// `{public URL}/v1/oauth/callback`, for the connect flow.
    pub redirect_url: Option<Url>,
}

/// A fresh grant from the token endpoint.
#[derive(Debug)]
pub struct TokenGrant {
    pub access_token: SecretString,
    pub expires_at: DateTime<Utc>,
    /// Present when the provider rotated it (Microsoft does on every refresh).
    pub refresh_token: Option<SecretString>,
    /// The OpenID Connect ID token, when the provider sent one.
    pub id_token: Option<String>,
    /// The scopes granted, space-separated, when the provider said.
    pub scopes: Option<String>,
}

/// Why a refresh failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RefreshError {
    /// The grant no longer works (`invalid_grant`, consent or interaction
    /// required): the organization must reconnect.
    #[error("grant refused by the provider: {reason}")]
    Revoked { reason: String },
    /// Try again later (network, 5xx, `temporarily_unavailable`).
    #[error("token endpoint unavailable: {message}")]
    Transient { message: String },
    /// A platform-wide problem of ours, not the organization's (client secret
    /// invalid or expired, provider not configured).
    #[error("OAuth client misconfigured: {message}")]
    Misconfigured { message: String },
}

/// Refreshes (and, for the connect flow, exchanges) tokens for both providers.
#[derive(Clone, Debug)]
pub struct TokenService {
    http: reqwest::Client,
    microsoft: Option<(ConfiguredClient, Vec<String>)>,
    google: Option<(ConfiguredClient, Vec<String>)>,
}

fn configure(app: &OAuthApp) -> (ConfiguredClient, Vec<String>) {
    let mut client = oauth2::Client::new(ClientId::new(app.client_id.clone()))
        .set_auth_uri(AuthUrl::from_url(app.auth_url.clone()))
        .set_token_uri(TokenUrl::from_url(app.token_url.clone()))
        // Both providers document client_secret in the request body.
        .set_auth_type(AuthType::RequestBody);
    if let Some(secret) = &app.client_secret {
        client = client.set_client_secret(ClientSecret::new(secret.expose_secret().to_owned()));
    }
    if let Some(redirect) = &app.redirect_url {
        client = client.set_redirect_uri(RedirectUrl::from_url(redirect.clone()));
    }
    (client, app.scopes.clone())
}

impl TokenService {
    /// `http` must not follow redirects; see [`crate::oauth_http_client`].
    pub fn new(
        http: reqwest::Client,
        microsoft: Option<&OAuthApp>,
        google: Option<&OAuthApp>,
    ) -> Self {
        TokenService {
            http,
            microsoft: microsoft.map(configure),
            google: google.map(configure),
        }
    }

    fn client(
        &self,
        provider: ProviderKind,
    ) -> Result<&(ConfiguredClient, Vec<String>), RefreshError> {
        match provider {
            ProviderKind::Microsoft => self.microsoft.as_ref(),
            ProviderKind::Google => self.google.as_ref(),
            ProviderKind::Default => None,
        }
        .ok_or_else(|| RefreshError::Misconfigured {
            message: format!("no OAuth client configured for {provider}"),
        })
    }

    /// Whether the provider's OAuth client is configured.
    pub fn is_configured(&self, provider: ProviderKind) -> bool {
        self.client(provider).is_ok()
    }

    /// The consent page URL for a new connection: authorization code flow with
    /// PKCE S256 (RFC 7636) and our `state`. Returns the URL and the PKCE
    /// verifier to keep (server-side) until the callback.
    pub fn authorize_url(
        &self,
        provider: ProviderKind,
        state: &str,
    ) -> Result<(Url, SecretString), RefreshError> {
        let (client, scopes) = self.client(provider)?;
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let state = state.to_owned();
        let mut request = client
            .authorize_url(move || CsrfToken::new(state))
            .add_scopes(scopes.iter().cloned().map(Scope::new))
            .set_pkce_challenge(challenge);
        if provider == ProviderKind::Google {
            // Without both, a reconnect returns no refresh token.
            request = request
                .add_extra_param("access_type", "offline")
                .add_extra_param("prompt", "consent");
        }
        let (url, _) = request.url();
        Ok((url, SecretString::from(verifier.secret().to_owned())))
    }

    /// The authorization-code grant with the PKCE verifier (RFC 6749 §4.1.3).
    pub async fn exchange_code(
        &self,
        provider: ProviderKind,
        code: &str,
        verifier: &SecretString,
    ) -> Result<TokenGrant, RefreshError> {
        let (client, _) = self.client(provider)?;
        let response = client
            .exchange_code(AuthorizationCode::new(code.to_owned()))
            .set_pkce_verifier(PkceCodeVerifier::new(verifier.expose_secret().to_owned()))
            .request_async(&self.http)
            .await
            .map_err(classify_token_error)?;
        Ok(grant(&response))
    }

    /// The refresh-token grant (RFC 6749 §6). `granted` are the scopes the
    /// organization consented to: Microsoft refuses a refresh asking for more.
    pub async fn refresh(
        &self,
        provider: ProviderKind,
        refresh_token: &SecretString,
        granted: Option<&str>,
    ) -> Result<TokenGrant, RefreshError> {
        let (client, scopes) = self.client(provider)?;
        let token = RefreshToken::new(refresh_token.expose_secret().to_owned());
        let mut request = client.exchange_refresh_token(&token);
        if provider == ProviderKind::Microsoft {
            // Microsoft's v2.0 endpoint documents `scope` on refresh requests.
            let scopes: Vec<String> = match granted {
                Some(g) => g.split_whitespace().map(str::to_owned).collect(),
                None => scopes.clone(),
            };
            request = request.add_scopes(scopes.into_iter().map(Scope::new));
        }
        let response = request
            .request_async(&self.http)
            .await
            .map_err(classify_token_error)?;
        Ok(grant(&response))
    }
}

fn grant(response: &OidcTokenResponse) -> TokenGrant {
    let expires_in = response.expires_in().unwrap_or(DEFAULT_EXPIRES_IN);
    TokenGrant {
        access_token: SecretString::from(response.access_token().secret().to_owned()),
        expires_at: Utc::now()
            + chrono::Duration::from_std(expires_in).unwrap_or(chrono::Duration::hours(1)),
        refresh_token: response
            .refresh_token()
            .map(|t| SecretString::from(t.secret().to_owned())),
        id_token: response.extra_fields().id_token.clone(),
        scopes: response
            .scopes()
            .map(|s| s.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(" ")),
    }
}

/// The `email` claim of an ID token received straight from the token endpoint
/// over TLS (OpenID Connect Core §3.1.3.7 allows TLS server validation in place
/// of checking the signature in that case).
pub fn id_token_email(id_token: &str) -> Option<String> {
    use base64::Engine as _;
    let payload = id_token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    if claims
        .get("email_verified")
        .and_then(serde_json::Value::as_bool)
        == Some(false)
    {
        return None;
    }
    claims.get("email")?.as_str().map(str::to_owned)
}

/// Maps token endpoint errors (RFC 6749 §5.2 plus Microsoft's and Google's
/// extensions) to what the worker does about them.
pub fn classify_token_error<RE: std::error::Error + 'static>(
    e: BasicRequestTokenError<RE>,
) -> RefreshError {
    match e {
        oauth2::RequestTokenError::ServerResponse(response) => {
            let description = response
                .error_description()
                .map(|d| d.lines().next().unwrap_or_default().to_owned())
                .unwrap_or_default();
            let code = response.error().as_ref().to_owned();
            let reason = if description.is_empty() {
                code.clone()
            } else {
                format!("{code}: {description}")
            };
            match response.error() {
                BasicErrorResponseType::InvalidGrant => RefreshError::Revoked { reason },
                BasicErrorResponseType::InvalidClient
                | BasicErrorResponseType::UnauthorizedClient => {
                    RefreshError::Misconfigured { message: reason }
                }
                BasicErrorResponseType::Extension(ext) => match ext.as_str() {
                    "interaction_required" | "consent_required" | "login_required" => {
                        RefreshError::Revoked { reason }
                    }
                    _ => RefreshError::Transient { message: reason },
                },
                _ => RefreshError::Transient { message: reason },
            }
        }
        oauth2::RequestTokenError::Request(e) => RefreshError::Transient {
            message: format!("request failed: {e}"),
        },
        oauth2::RequestTokenError::Parse(_, _) => RefreshError::Transient {
            message: "token endpoint answered with an unreadable body".into(),
        },
        oauth2::RequestTokenError::Other(m) => RefreshError::Transient { message: m },
    }
}
