//! OAuth 2.0 with the `oauth2` crate: the refresh-token grant for the worker,
//! and (for the connect flow) authorization URLs with PKCE and the code exchange.
//!
//! The HTTP client used here never follows redirects (RFC 6749 §10.5 / the
//! `oauth2` crate's advice: a token endpoint that redirects is an attack).

use std::time::Duration;

use chrono::{DateTime, Utc};
use mail_dispatch_domain::ProviderKind;
use oauth2::basic::{BasicClient, BasicErrorResponseType, BasicRequestTokenError};
use oauth2::{
    AuthType, AuthUrl, ClientId, ClientSecret, EndpointNotSet, EndpointSet, RefreshToken, Scope,
    TokenResponse, TokenUrl,
};
use secrecy::{ExposeSecret, SecretString};
use url::Url;

/// Lifetime assumed when a token response carries no `expires_in`.
const DEFAULT_EXPIRES_IN: Duration = Duration::from_secs(3600);

type ConfiguredClient =
    BasicClient<EndpointSet, EndpointNotSet, EndpointNotSet, EndpointNotSet, EndpointSet>;

/// One provider's OAuth application.
#[derive(Clone, Debug)]
pub struct OAuthApp {
    pub client_id: String,
    pub client_secret: Option<SecretString>,
    pub auth_url: Url,
    pub token_url: Url,
    pub scopes: Vec<String>,
}

/// A fresh grant from the token endpoint.
#[derive(Debug)]
pub struct TokenGrant {
    pub access_token: SecretString,
    pub expires_at: DateTime<Utc>,
    /// Present when the provider rotated it (Microsoft does on every refresh).
    pub refresh_token: Option<SecretString>,
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
    let mut client = BasicClient::new(ClientId::new(app.client_id.clone()))
        .set_auth_uri(AuthUrl::from_url(app.auth_url.clone()))
        .set_token_uri(TokenUrl::from_url(app.token_url.clone()))
        // Both providers document client_secret in the request body.
        .set_auth_type(AuthType::RequestBody);
    if let Some(secret) = &app.client_secret {
        client = client.set_client_secret(ClientSecret::new(secret.expose_secret().to_owned()));
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

    /// The refresh-token grant (RFC 6749 §6).
    pub async fn refresh(
        &self,
        provider: ProviderKind,
        refresh_token: &SecretString,
    ) -> Result<TokenGrant, RefreshError> {
        let (client, scopes) = self.client(provider)?;
        let token = RefreshToken::new(refresh_token.expose_secret().to_owned());
        let mut request = client.exchange_refresh_token(&token);
        if provider == ProviderKind::Microsoft {
            // Microsoft's v2.0 endpoint documents `scope` on refresh requests.
            request = request.add_scopes(scopes.iter().cloned().map(Scope::new));
        }
        let response = request
            .request_async(&self.http)
            .await
            .map_err(classify_token_error)?;
        Ok(grant(&response))
    }
}

fn grant(response: &oauth2::basic::BasicTokenResponse) -> TokenGrant {
    let expires_in = response.expires_in().unwrap_or(DEFAULT_EXPIRES_IN);
    TokenGrant {
        access_token: SecretString::from(response.access_token().secret().to_owned()),
        expires_at: Utc::now()
            + chrono::Duration::from_std(expires_in).unwrap_or(chrono::Duration::hours(1)),
        refresh_token: response
            .refresh_token()
            .map(|t| SecretString::from(t.secret().to_owned())),
    }
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
