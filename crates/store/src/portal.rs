//! The hosted settings page: single-use links, browser sessions bound to one
//! organization, and the rate limit of its test sends.
//!
//! Links and sessions are found by the SHA-256 of their secret value (the caller
//! hashes); the values themselves are never stored.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::{Store, StoreError};

/// What the host application chose for a session: where to go back, the
/// language and its branding (already validated by the caller).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortalSettings {
    pub organization_id: String,
    pub return_url: String,
    pub locale: Option<String>,
    pub product_name: Option<String>,
    pub accent_color: Option<String>,
}

/// A live browser session.
#[derive(Clone, Debug)]
pub struct PortalSession {
    pub settings: PortalSettings,
    /// The synchronizer token its forms carry.
    pub csrf_token: String,
    pub expires_at: DateTime<Utc>,
}

/// What opening a link found.
#[derive(Debug)]
pub enum LinkLookup {
    /// Valid, now used: start the session.
    Valid(PortalSettings),
    /// Known, past its expiry.
    Expired { return_url: String },
    /// Known, opened once already.
    Used { return_url: String },
    /// Never issued (forged or mistyped).
    Unknown,
}

/// What a session cookie found.
#[derive(Debug)]
pub enum SessionLookup {
    Valid(PortalSession),
    /// Known, past its lifetime: the host application must issue a new link.
    Expired {
        return_url: String,
    },
    /// No such session.
    Unknown,
}

fn settings_from(row: &tokio_postgres::Row) -> PortalSettings {
    PortalSettings {
        organization_id: row.get("organization_id"),
        return_url: row.get("return_url"),
        locale: row.get("locale"),
        product_name: row.get("product_name"),
        accent_color: row.get("accent_color"),
    }
}

impl Store {
    /// Records a link; also drops links and sessions expired for a day.
    pub async fn create_portal_link(
        &self,
        token_hash: &[u8],
        s: &PortalSettings,
        ttl: Duration,
    ) -> Result<DateTime<Utc>, StoreError> {
        let client = self.client().await?;
        for cleanup in [
            "DELETE FROM portal_links WHERE expires_at < now() - interval '1 day'",
            "DELETE FROM portal_sessions WHERE expires_at < now() - interval '1 day'",
            "DELETE FROM portal_test_sends WHERE sent_at < now() - interval '1 day'",
        ] {
            client.execute(cleanup, &[]).await?;
        }
        let row = client
            .query_one(
                "INSERT INTO portal_links (token_hash, organization_id, return_url, locale, product_name,
                     accent_color, expires_at)
                 VALUES ($1, $2, $3, $4, $5, $6, now() + make_interval(secs => $7::float8))
                 RETURNING expires_at",
                &[
                    &token_hash,
                    &s.organization_id,
                    &s.return_url,
                    &s.locale,
                    &s.product_name,
                    &s.accent_color,
                    &ttl.as_secs_f64(),
                ],
            )
            .await?;
        Ok(row.get(0))
    }

    /// Opens a link: valid at most once, before it expires.
    pub async fn use_portal_link(&self, token_hash: &[u8]) -> Result<LinkLookup, StoreError> {
        let client = self.client().await?;
        let used = client
            .query_opt(
                "UPDATE portal_links SET used_at = now()
                 WHERE token_hash = $1 AND used_at IS NULL AND expires_at > now()
                 RETURNING organization_id, return_url, locale, product_name, accent_color",
                &[&token_hash],
            )
            .await?;
        if let Some(row) = used {
            return Ok(LinkLookup::Valid(settings_from(&row)));
        }
        let row = client
            .query_opt(
                "SELECT return_url, used_at IS NOT NULL AS used FROM portal_links WHERE token_hash = $1",
                &[&token_hash],
            )
            .await?;
        Ok(match row {
            None => LinkLookup::Unknown,
            Some(row) if row.get::<_, bool>("used") => LinkLookup::Used {
                return_url: row.get("return_url"),
            },
            Some(row) => LinkLookup::Expired {
                return_url: row.get("return_url"),
            },
        })
    }

    /// Starts a browser session.
    pub async fn create_portal_session(
        &self,
        session_hash: &[u8],
        s: &PortalSettings,
        csrf_token: &str,
        lifetime: Duration,
    ) -> Result<DateTime<Utc>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "INSERT INTO portal_sessions (session_hash, organization_id, return_url, locale,
                     product_name, accent_color, csrf_token, expires_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, now() + make_interval(secs => $8::float8))
                 RETURNING expires_at",
                &[
                    &session_hash,
                    &s.organization_id,
                    &s.return_url,
                    &s.locale,
                    &s.product_name,
                    &s.accent_color,
                    &csrf_token,
                    &lifetime.as_secs_f64(),
                ],
            )
            .await?;
        Ok(row.get(0))
    }

    /// The session behind a cookie.
    pub async fn portal_session(&self, session_hash: &[u8]) -> Result<SessionLookup, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT organization_id, return_url, locale, product_name, accent_color, csrf_token,
                     expires_at, expires_at > now() AS live
                 FROM portal_sessions WHERE session_hash = $1",
                &[&session_hash],
            )
            .await?;
        Ok(match row {
            None => SessionLookup::Unknown,
            Some(row) if row.get::<_, bool>("live") => SessionLookup::Valid(PortalSession {
                settings: settings_from(&row),
                csrf_token: row.get("csrf_token"),
                expires_at: row.get("expires_at"),
            }),
            Some(row) => SessionLookup::Expired {
                return_url: row.get("return_url"),
            },
        })
    }

    /// Takes one test send of `organization_id` if fewer than `limit` were taken
    /// within `window`; returns whether it was taken. One statement: requests
    /// racing each other may each see the count before the others' inserts, so
    /// under concurrency the limit can be passed by the number of racing requests
    /// (a browser's tabs), which is fine for what it guards (a flood of test mail).
    pub async fn take_portal_test_send(
        &self,
        organization_id: &str,
        limit: i64,
        window: Duration,
    ) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let taken = client
            .execute(
                "INSERT INTO portal_test_sends (organization_id)
                 SELECT $1 WHERE (SELECT count(*) FROM portal_test_sends
                                  WHERE organization_id = $1
                                    AND sent_at > now() - make_interval(secs => $3::float8)) < $2",
                &[&organization_id, &limit, &window.as_secs_f64()],
            )
            .await?;
        Ok(taken == 1)
    }
}
