//! Grants waiting for the host application's confirmation.
//!
//! The OAuth callback runs in whichever browser finished the consent, which is
//! not necessarily the organization admin's: a grant is therefore kept here,
//! unused, until the host application confirms the one-time `connection` value
//! from the admin's own authenticated session. Only its SHA-256 is stored; the
//! tokens are encrypted as in `integrations`, bound to this row.

use std::time::Duration;

use chrono::{DateTime, Utc};
use mail_dispatch_domain::ProviderKind;
use secrecy::SecretString;

use crate::{NewConnection, Store, StoreError};

/// What a confirmation found.
#[derive(Debug)]
pub enum ConfirmLookup {
    /// Valid, now consumed: the grant to store.
    Valid(NewConnection),
    /// Known, but past its expiry: the consent must be given again.
    Expired,
    /// Already confirmed once.
    Used,
    /// Never issued for this organization.
    Unknown,
}

/// An unconfirmed grant past its expiry, removed: revoke it where the provider allows.
#[derive(Debug)]
pub struct ExpiredConnection {
    pub organization_id: String,
    pub provider: ProviderKind,
    pub refresh_token: Option<SecretString>,
}

fn ctx(hash: &[u8], column: &str) -> String {
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    format!("pending/{hex}/{column}")
}

impl Store {
    /// Keeps a grant until its confirmation (or expiry). `portal_session`: the
    /// portal session that started the connect, the only one that may confirm it.
    pub async fn create_pending_connection(
        &self,
        connection_hash: &[u8],
        c: &NewConnection,
        ttl: Duration,
        portal_session: Option<&[u8]>,
    ) -> Result<DateTime<Utc>, StoreError> {
        let cipher = self.cipher();
        let refresh = cipher.encrypt(&ctx(connection_hash, "refresh_token"), &c.refresh_token);
        let (access, expires) = match &c.access_token {
            Some((token, at)) => (
                Some(cipher.encrypt(&ctx(connection_hash, "access_token"), token)),
                Some(*at),
            ),
            None => (None, None),
        };
        let client = self.client().await?;
        let row = client
            .query_one(
                "INSERT INTO pending_connections (connection_hash, organization_id, provider, account_email,
                     account_id, account_tenant, granted_scopes, refresh_token, access_token,
                     access_token_expires_at, expires_at, portal_session)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, now() + make_interval(secs => $11::float8), $12)
                 RETURNING expires_at",
                &[
                    &connection_hash,
                    &c.organization_id,
                    &c.provider.as_str(),
                    &c.account_email,
                    &c.account_id,
                    &c.account_tenant,
                    &c.granted_scopes,
                    &refresh,
                    &access,
                    &expires,
                    &ttl.as_secs_f64(),
                    &portal_session,
                ],
            )
            .await?;
        Ok(row.get(0))
    }

    /// Consumes a pending grant of `organization_id`: valid at most once, before it
    /// expires. Its tokens leave this table with it. `portal_session` must be the
    /// session the connect was started in (`None`: started through the admin API);
    /// a grant of another session is `Unknown` to this one.
    pub async fn confirm_pending_connection(
        &self,
        organization_id: &str,
        connection_hash: &[u8],
        portal_session: Option<&[u8]>,
    ) -> Result<ConfirmLookup, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "WITH taken AS (
                     SELECT * FROM pending_connections
                     WHERE connection_hash = $1 AND organization_id = $2
                       AND portal_session IS NOT DISTINCT FROM $3
                       AND confirmed_at IS NULL AND expires_at > now()
                     FOR UPDATE
                 )
                 UPDATE pending_connections p SET confirmed_at = now(), refresh_token = ''::bytea,
                     access_token = NULL
                 FROM taken WHERE p.connection_hash = taken.connection_hash
                 RETURNING taken.provider, taken.account_email, taken.account_id, taken.account_tenant,
                     taken.granted_scopes, taken.refresh_token, taken.access_token,
                     taken.access_token_expires_at",
                &[&connection_hash, &organization_id, &portal_session],
            )
            .await?;
        if let Some(row) = row {
            let cipher = self.cipher();
            let refresh: Vec<u8> = row.get("refresh_token");
            let access: Option<Vec<u8>> = row.get("access_token");
            let expires: Option<DateTime<Utc>> = row.get("access_token_expires_at");
            let access_token = match (access, expires) {
                (Some(a), Some(at)) => Some((
                    cipher.decrypt(&ctx(connection_hash, "access_token"), &a)?,
                    at,
                )),
                _ => None,
            };
            return Ok(ConfirmLookup::Valid(NewConnection {
                organization_id: organization_id.to_owned(),
                provider: ProviderKind::parse(row.get("provider")).unwrap_or(ProviderKind::Default),
                account_email: row.get("account_email"),
                account_id: row.get("account_id"),
                account_tenant: row.get("account_tenant"),
                refresh_token: cipher.decrypt(&ctx(connection_hash, "refresh_token"), &refresh)?,
                access_token,
                granted_scopes: row.get("granted_scopes"),
            }));
        }
        let row = client
            .query_opt(
                "SELECT confirmed_at IS NOT NULL AS used FROM pending_connections
                 WHERE connection_hash = $1 AND organization_id = $2
                   AND portal_session IS NOT DISTINCT FROM $3",
                &[&connection_hash, &organization_id, &portal_session],
            )
            .await?;
        Ok(match row {
            None => ConfirmLookup::Unknown,
            Some(row) if row.get::<_, bool>("used") => ConfirmLookup::Used,
            Some(_) => ConfirmLookup::Expired,
        })
    }

    /// Takes the tokens of up to `limit` unconfirmed grants past their expiry and
    /// returns them (decrypted, to be revoked). The rows stay a day without their
    /// tokens, so that a late confirmation is told "expired" rather than "unknown".
    pub async fn take_expired_pending_connections(
        &self,
        limit: i64,
    ) -> Result<Vec<ExpiredConnection>, StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "DELETE FROM pending_connections WHERE expires_at < now() - interval '1 day'",
                &[],
            )
            .await?;
        let rows = client
            .query(
                "WITH expired AS (
                     SELECT connection_hash, refresh_token FROM pending_connections
                     WHERE confirmed_at IS NULL AND expires_at <= now() AND refresh_token <> ''::bytea
                     ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED
                 )
                 UPDATE pending_connections p SET refresh_token = ''::bytea, access_token = NULL
                 FROM expired WHERE p.connection_hash = expired.connection_hash
                 RETURNING p.connection_hash, p.organization_id, p.provider, expired.refresh_token",
                &[&limit],
            )
            .await?;
        let cipher = self.cipher();
        Ok(rows
            .iter()
            .map(|row| {
                let hash: Vec<u8> = row.get("connection_hash");
                let refresh: Vec<u8> = row.get("refresh_token");
                ExpiredConnection {
                    organization_id: row.get("organization_id"),
                    provider: ProviderKind::parse(row.get("provider"))
                        .unwrap_or(ProviderKind::Default),
                    // A token that no longer decrypts cannot be revoked; it is dropped all the same.
                    refresh_token: cipher.decrypt(&ctx(&hash, "refresh_token"), &refresh).ok(),
                }
            })
            .collect())
    }

    /// Unconfirmed grants of an organization still waiting (tests and `integrations show`).
    pub async fn pending_connection_count(&self, organization_id: &str) -> Result<i64, StoreError> {
        let client = self.client().await?;
        Ok(client
            .query_one(
                "SELECT count(*) FROM pending_connections
                 WHERE organization_id = $1 AND confirmed_at IS NULL AND expires_at > now()",
                &[&organization_id],
            )
            .await?
            .get(0))
    }
}
