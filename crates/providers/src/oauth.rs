//! OAuth 2.0 with the `oauth2` crate: the refresh-token grant for the worker,
//! and (for the connect flow) authorization URLs with PKCE and the code exchange.
//!
//! The HTTP client used here never follows redirects (RFC 6749 §10.5 / the
//! `oauth2` crate's advice: a token endpoint that redirects is an attack).

use std::time::Duration;

use chrono::{DateTime, Utc};
use mail_dispatch_domain::ProviderKind;
use oauth2::basic::{
    BasicErrorResponse, BasicRequestTokenError, BasicRevocationErrorResponse,
    BasicTokenIntrospectionResponse, BasicTokenType,
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
    /// The grant no longer works for a reason of the organization's (revoked,
    /// expired, a tenant policy): an admin of the organization must act, then
    /// reconnect. `reason` tells them what to do; `code` is the provider's
    /// (`AADSTS700082`, `invalid_grant`).
    #[error("grant refused by the provider: {reason}")]
    Revoked { reason: String, code: String },
    /// Try again later (network, 5xx, `temporarily_unavailable`).
    #[error("token endpoint unavailable: {message}")]
    Transient { message: String },
    /// A platform-wide problem of ours, not the organization's (client secret
    /// invalid or expired, provider not configured): an operator must fix it.
    #[error("OAuth client misconfigured: {message}")]
    Misconfigured { message: String },
    /// The token endpoint refused the request for a reason neither listed above
    /// nor temporary: retrying would not help, and the grant may still be good.
    #[error("token request refused: {message}")]
    Rejected { message: String },
}

/// Refreshes (and, for the connect flow, exchanges) tokens for both providers.
#[derive(Clone, Debug)]
pub struct TokenService {
    http: reqwest::Client,
    microsoft: Option<(ConfiguredClient, Vec<String>)>,
    google: Option<(ConfiguredClient, Vec<String>)>,
    microsoft_app: Option<OAuthApp>,
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
            microsoft_app: microsoft.cloned(),
        }
    }

    /// The client id of `provider`'s OAuth application.
    pub fn client_id(&self, provider: ProviderKind) -> Option<&str> {
        self.client(provider)
            .ok()
            .map(|(client, _)| client.client_id().as_str())
    }

    /// The scopes requested from `provider`.
    pub fn requested_scopes(&self, provider: ProviderKind) -> &[String] {
        self.client(provider).map_or(&[], |(_, s)| s.as_slice())
    }

    /// Microsoft's admin-consent page for this app (v2.0 `adminconsent`,
    /// learn.microsoft.com/entra/identity-platform/v2-admin-consent): a tenant
    /// administrator grants the app for the whole tenant, for tenants that do not
    /// let users consent. It needs an organizational authority: `common` becomes
    /// `organizations`. The browser comes back to the same callback with
    /// `admin_consent=True&tenant=…&state=…` and no code.
    pub fn admin_consent_url(&self, state: &str) -> Result<Url, RefreshError> {
        let app = self
            .microsoft_app
            .as_ref()
            .ok_or_else(|| RefreshError::Misconfigured {
                message: "no OAuth client configured for microsoft".into(),
            })?;
        let authorize = app.auth_url.as_str();
        let base = authorize
            .strip_suffix("/oauth2/v2.0/authorize")
            .unwrap_or(authorize);
        let (root, tenant) = base.rsplit_once('/').unwrap_or((base, "organizations"));
        let tenant = if tenant == "common" || tenant == "consumers" {
            "organizations"
        } else {
            tenant
        };
        let mut url = Url::parse(&format!("{root}/{tenant}/v2.0/adminconsent")).map_err(|e| {
            RefreshError::Misconfigured {
                message: format!("admin consent URL: {e}"),
            }
        })?;
        // Every scope the users' consent will ask for, OpenID Connect and
        // offline_access included: in a tenant where users may not consent, those
        // need the administrator's consent too.
        let scope = app.scopes.join(" ");
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("client_id", &app.client_id);
            q.append_pair("scope", &scope);
            if let Some(redirect) = &app.redirect_url {
                q.append_pair("redirect_uri", redirect.as_str());
            }
            q.append_pair("state", state);
        }
        Ok(url)
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

    /// The origin of `provider`'s consent page (for a `form-action` policy that
    /// lets a form's redirect reach it).
    pub fn authorize_origin(&self, provider: ProviderKind) -> Option<url::Origin> {
        self.client(provider)
            .ok()
            .map(|(client, _)| client.auth_uri().url().origin())
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
            // Microsoft's v2.0 endpoint documents `scope` on refresh requests, and
            // returns a new refresh token only if it includes `offline_access`.
            let scopes = crate::scopes::microsoft_refresh(granted, scopes);
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

/// The claims of an ID token that mail-dispatch reads.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct IdTokenClaims {
    /// Google's stable account id; Microsoft's app-specific subject.
    #[serde(default)]
    pub sub: Option<String>,
    /// Microsoft: the user's object id, stable across apps.
    #[serde(default)]
    pub oid: Option<String>,
    /// Microsoft: the tenant id (`9188040d-6c67-4c5b-b112-36a304b66dad` for personal accounts).
    #[serde(default)]
    pub tid: Option<String>,
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default)]
    pub email_verified: Option<bool>,
    /// Google: the Workspace domain; absent for consumer accounts.
    #[serde(default)]
    pub hd: Option<String>,
    #[serde(default)]
    pub preferred_username: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    /// Whom the token was issued for: a client id, or a list of them.
    #[serde(default)]
    pub aud: Option<serde_json::Value>,
}

impl IdTokenClaims {
    /// Whether the token was issued for this client (OpenID Connect Core §3.1.3.7:
    /// the `aud` claim must contain the client id). Even straight from the token
    /// endpoint, a token for another client is not ours to trust.
    pub fn issued_for(&self, client_id: &str) -> bool {
        match &self.aud {
            Some(serde_json::Value::String(aud)) => aud == client_id,
            Some(serde_json::Value::Array(auds)) => {
                auds.iter().any(|a| a.as_str() == Some(client_id))
            }
            _ => false,
        }
    }
}

/// The tenant id Microsoft gives personal (consumer) accounts.
pub const MICROSOFT_CONSUMER_TENANT: &str = "9188040d-6c67-4c5b-b112-36a304b66dad";

/// The claims of an ID token received straight from the token endpoint over TLS
/// (OpenID Connect Core §3.1.3.7 allows TLS server validation in place of
/// checking the signature in that case).
pub fn id_token_claims(id_token: &str) -> Option<IdTokenClaims> {
    use base64::Engine as _;
    let payload = id_token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The verified `email` claim of an ID token (Google puts the account's address there).
pub fn id_token_email(id_token: &str) -> Option<String> {
    let claims = id_token_claims(id_token)?;
    if claims.email_verified == Some(false) {
        return None;
    }
    claims.email
}

/// The AADSTS number in an Entra error description (`AADSTS700082: …`).
pub fn aadsts(description: &str) -> Option<u32> {
    let start = description.find("AADSTS")? + "AADSTS".len();
    let digits: String = description[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// Entra conditions that belong to one organization's tenant or user, with what
/// its admin must do (codes from learn.microsoft.com/entra/identity-platform/reference-error-codes).
fn entra_organization_condition(code: u32) -> Option<&'static str> {
    Some(match code {
        700016 => {
            "the app is not registered in your Microsoft Entra tenant (an administrator removed it, or it was never consented there): reconnect, with an administrator granting consent if your tenant requires it"
        }
        7000112 => {
            "the app is disabled in your Microsoft Entra tenant: an administrator must enable it again under Enterprise applications, then reconnect"
        }
        50105 => {
            "the connected user is not assigned to the app in your Microsoft Entra tenant: an administrator must assign the user (or turn off \"assignment required\"), then reconnect"
        }
        53003 => {
            "a Conditional Access policy of your tenant blocks the app: an administrator must allow it for the sending account, then reconnect"
        }
        70044 | 50076 | 50079 => {
            "your tenant's sign-in frequency or multi-factor policy ended the session: reconnect (a dedicated sending mailbox excluded from that policy avoids this)"
        }
        700082 => "the authorization expired after 90 days without use: reconnect",
        65001 | 90094 | 90095 => {
            "consent for the app is missing in your tenant: an administrator must grant consent, then reconnect"
        }
        70008 | 50173 | 70043 | 50133 => {
            "the authorization expired or was revoked (for example after a password reset): reconnect"
        }
        _ => return None,
    })
}

/// Maps token endpoint errors (RFC 6749 §5.2 plus Microsoft's and Google's
/// extensions) to what the worker does about them. Entra's AADSTS code, when
/// there is one, decides first: `unauthorized_client` is an operator problem in
/// general, but AADSTS700016 / 7000112 are the customer tenant's.
pub fn classify_token_error<RE: std::error::Error + 'static>(
    e: BasicRequestTokenError<RE>,
) -> RefreshError {
    match e {
        oauth2::RequestTokenError::ServerResponse(response) => {
            let full = response.error_description().cloned().unwrap_or_default();
            let description = full.lines().next().unwrap_or_default().to_owned();
            let error = response.error().as_ref().to_owned();
            classify_token_answer(&error, &description)
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

/// [`classify_token_error`] on the answer's `error` and first description line.
pub fn classify_token_answer(error: &str, description: &str) -> RefreshError {
    let detail = if description.is_empty() {
        error.to_owned()
    } else {
        format!("{error}: {description}")
    };
    if let Some(code) = aadsts(description) {
        if let Some(what) = entra_organization_condition(code) {
            return RefreshError::Revoked {
                reason: format!("{what} (AADSTS{code})"),
                code: format!("AADSTS{code}"),
            };
        }
        if matches!(code, 7000215 | 7000222) {
            return RefreshError::Misconfigured {
                message: format!(
                    "the Microsoft client secret is invalid or expired (AADSTS{code}): set a valid MAIL_DISPATCH_MICROSOFT_CLIENT_SECRET"
                ),
            };
        }
    }
    match error {
        "invalid_grant" | "interaction_required" | "consent_required" | "login_required" => {
            RefreshError::Revoked {
                reason: format!("the provider refused the authorization ({detail}): reconnect"),
                code: error.to_owned(),
            }
        }
        "invalid_client" | "unauthorized_client" => RefreshError::Misconfigured { message: detail },
        "temporarily_unavailable" | "server_error" => RefreshError::Transient { message: detail },
        _ => RefreshError::Rejected { message: detail },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entra(code: u32, error: &str) -> RefreshError {
        classify_token_answer(
            error,
            &format!("AADSTS{code}: something happened. Trace ID: x"),
        )
    }

    /// Each Entra condition lands where its owner can act on it (issue #10 §3.2).
    #[test]
    fn entra_codes_are_classified_by_cause() {
        for (code, error) in [
            (700016, "unauthorized_client"),
            (7000112, "unauthorized_client"),
            (50105, "invalid_grant"),
            (53003, "invalid_grant"),
            (70044, "invalid_grant"),
            (50076, "invalid_grant"),
            (700082, "invalid_grant"),
            (65001, "invalid_grant"),
            (70008, "invalid_grant"),
            (50173, "invalid_grant"),
        ] {
            match entra(code, error) {
                RefreshError::Revoked { reason, code: c } => {
                    assert_eq!(c, format!("AADSTS{code}"));
                    assert!(reason.contains(&format!("AADSTS{code}")), "{reason}");
                }
                other => panic!("{code}: {other:?}"),
            }
        }
        for code in [7000215, 7000222] {
            assert!(
                matches!(
                    entra(code, "invalid_client"),
                    RefreshError::Misconfigured { .. }
                ),
                "{code}"
            );
        }
        assert!(matches!(
            entra(700016, "unauthorized_client"),
            RefreshError::Revoked { .. }
        ));
        assert!(matches!(
            classify_token_answer("unauthorized_client", "no code"),
            RefreshError::Misconfigured { .. }
        ));
        assert!(matches!(
            classify_token_answer("temporarily_unavailable", ""),
            RefreshError::Transient { .. }
        ));
        assert!(matches!(
            classify_token_answer("invalid_grant", "Token has been expired or revoked."),
            RefreshError::Revoked { .. }
        ));
        for unknown in ["invalid_request", "invalid_scope", "something_new"] {
            assert!(
                matches!(
                    classify_token_answer(unknown, ""),
                    RefreshError::Rejected { .. }
                ),
                "{unknown} is not retried forever"
            );
        }
    }

    #[test]
    fn id_token_claims_are_read() {
        use base64::Engine as _;
        let b64 = |v: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        let token = format!(
            "{}.{}.sig",
            b64("{}"),
            b64(
                r#"{"sub":"s","oid":"o","tid":"t","email":"a@b.c","email_verified":true,"hd":"b.c"}"#
            )
        );
        let c = id_token_claims(&token).unwrap();
        assert_eq!(c.oid.as_deref(), Some("o"));
        assert_eq!(c.tid.as_deref(), Some("t"));
        assert_eq!(c.hd.as_deref(), Some("b.c"));
        assert_eq!(id_token_email(&token).as_deref(), Some("a@b.c"));
    }

    #[test]
    fn an_id_token_must_be_issued_for_our_client() {
        let claims = |aud: serde_json::Value| IdTokenClaims {
            aud: Some(aud),
            ..Default::default()
        };
        assert!(claims(serde_json::json!("ours")).issued_for("ours"));
        assert!(claims(serde_json::json!(["x", "ours"])).issued_for("ours"));
        assert!(!claims(serde_json::json!("theirs")).issued_for("ours"));
        assert!(
            !IdTokenClaims::default().issued_for("ours"),
            "no aud, no trust"
        );
    }
}
