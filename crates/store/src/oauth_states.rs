//! Pending OAuth authorizations: `state` → (organization, provider, PKCE verifier,
//! return_to). Stored server-side so any replica can finish the flow; single use;
//! expiring.

use std::time::Duration;

use chrono::{DateTime, Utc};
use mail_dispatch_domain::ProviderKind;
use secrecy::SecretString;

use crate::{Store, StoreError};

/// What a state was issued for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatePurpose {
    /// A user's consent: the callback gets a code.
    Connect,
    /// A Microsoft tenant administrator's consent: the callback gets
    /// `admin_consent=True` and no code.
    AdminConsent,
}

impl StatePurpose {
    fn as_str(self) -> &'static str {
        match self {
            StatePurpose::Connect => "connect",
            StatePurpose::AdminConsent => "admin_consent",
        }
    }
}

/// A pending authorization, as found by its state.
#[derive(Debug)]
pub struct OAuthState {
    pub organization_id: String,
    pub provider: ProviderKind,
    pub purpose: StatePurpose,
    pub pkce_verifier: SecretString,
    pub return_to: String,
    /// SHA-256 of the portal session that started it, when the hosted settings
    /// page did: the consent may then be confirmed by that session only.
    pub portal_session: Option<Vec<u8>>,
}

/// What a callback's `state` turned out to be.
#[derive(Debug)]
pub enum StateLookup {
    /// Valid and now consumed: it cannot be used again.
    Valid(OAuthState),
    /// Known but past its expiry.
    Expired { return_to: String },
    /// Known and already used once.
    Reused { return_to: String },
    /// Never issued (forged, or from another deployment).
    Unknown,
}

impl Store {
    /// Records a new authorization request. Also drops requests expired for a day.
    #[expect(
        clippy::too_many_arguments,
        reason = "one column each; a struct would only rename them"
    )]
    pub async fn create_oauth_state(
        &self,
        state: &str,
        organization_id: &str,
        provider: ProviderKind,
        pkce_verifier: &SecretString,
        return_to: &str,
        ttl: Duration,
        purpose: StatePurpose,
        portal_session: Option<&[u8]>,
    ) -> Result<DateTime<Utc>, StoreError> {
        let verifier = self
            .cipher()
            .encrypt(&format!("oauth_state/{state}"), pkce_verifier);
        let client = self.client().await?;
        client
            .execute(
                "DELETE FROM oauth_states WHERE expires_at < now() - interval '1 day'",
                &[],
            )
            .await?;
        let row = client
            .query_one(
                "INSERT INTO oauth_states (state, organization_id, provider, pkce_verifier, return_to, expires_at, purpose,
                     portal_session)
                 VALUES ($1, $2, $3, $4, $5, now() + make_interval(secs => $6::float8), $7, $8)
                 RETURNING expires_at",
                &[&state, &organization_id, &provider.as_str(), &verifier, &return_to, &ttl.as_secs_f64(), &purpose.as_str(),
                  &portal_session],
            )
            .await?;
        Ok(row.get(0))
    }

    /// Consumes a state: valid at most once, and only before it expires.
    pub async fn consume_oauth_state(&self, state: &str) -> Result<StateLookup, StoreError> {
        let client = self.client().await?;
        let consumed = client
            .query_opt(
                "UPDATE oauth_states SET consumed_at = now()
                 WHERE state = $1 AND consumed_at IS NULL AND expires_at > now()
                 RETURNING organization_id, provider, pkce_verifier, return_to, purpose, portal_session",
                &[&state],
            )
            .await?;
        if let Some(row) = consumed {
            let verifier: Vec<u8> = row.get("pkce_verifier");
            return Ok(StateLookup::Valid(OAuthState {
                organization_id: row.get("organization_id"),
                provider: ProviderKind::parse(row.get("provider")).unwrap_or(ProviderKind::Default),
                purpose: if row.get::<_, &str>("purpose") == "admin_consent" {
                    StatePurpose::AdminConsent
                } else {
                    StatePurpose::Connect
                },
                pkce_verifier: self
                    .cipher()
                    .decrypt(&format!("oauth_state/{state}"), &verifier)?,
                return_to: row.get("return_to"),
                portal_session: row.get("portal_session"),
            }));
        }
        let row = client
            .query_opt(
                "SELECT return_to, consumed_at IS NOT NULL AS used FROM oauth_states WHERE state = $1",
                &[&state],
            )
            .await?;
        Ok(match row {
            None => StateLookup::Unknown,
            Some(row) if row.get::<_, bool>("used") => StateLookup::Reused {
                return_to: row.get("return_to"),
            },
            Some(row) => StateLookup::Expired {
                return_to: row.get("return_to"),
            },
        })
    }

    /// Count of rows in `oauth_states` (for tests of "nothing stored").
    pub async fn oauth_state_count(&self) -> Result<i64, StoreError> {
        let client = self.client().await?;
        Ok(client
            .query_one("SELECT count(*) FROM oauth_states", &[])
            .await?
            .get(0))
    }
}
