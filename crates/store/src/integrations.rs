//! Organization integrations and their encrypted tokens.

use chrono::{DateTime, Utc};
use mail_dispatch_domain::ProviderKind;
use secrecy::SecretString;
use tokio_postgres::Row;

use crate::{Store, StoreError};

/// Lifecycle of an integration (contract §5). `not_configured` is the absence of a row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IntegrationStatus {
    /// Connected through OAuth; the sender is not saved and tested yet.
    PendingSender,
    /// Sender tested: the organization's mail goes through its provider.
    Active,
    /// The provider refused the stored grant: an admin must reconnect.
    NeedsReauth,
}

impl IntegrationStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            IntegrationStatus::PendingSender => "pending_sender",
            IntegrationStatus::Active => "active",
            IntegrationStatus::NeedsReauth => "needs_reauth",
        }
    }

    fn parse(raw: &str) -> Self {
        match raw {
            "active" => IntegrationStatus::Active,
            "needs_reauth" => IntegrationStatus::NeedsReauth,
            _ => IntegrationStatus::PendingSender,
        }
    }
}

/// What happens to an organization's mail when its grant stops working.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fallback {
    /// Jobs fail with `auth_revoked`.
    None,
    /// Jobs go out from the platform sender, replies pointed at the organization's sender.
    PlatformSender,
}

impl Fallback {
    pub fn as_str(self) -> &'static str {
        match self {
            Fallback::None => "none",
            Fallback::PlatformSender => "platform_sender",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "none" => Some(Fallback::None),
            "platform_sender" => Some(Fallback::PlatformSender),
            _ => None,
        }
    }
}

/// An integration as operators and the worker see it: never a token.
#[derive(Clone, Debug, PartialEq)]
pub struct Integration {
    pub organization_id: String,
    pub provider: ProviderKind,
    pub status: IntegrationStatus,
    pub account_email: Option<String>,
    /// The account's stable id: Microsoft `oid`, Google `sub`.
    pub account_id: Option<String>,
    /// Microsoft `tid`; Google `hd` (the Workspace domain, none for consumer accounts).
    pub account_tenant: Option<String>,
    pub sender_email: Option<String>,
    pub sender_name: Option<String>,
    pub fallback: Fallback,
    /// Microsoft Graph `saveToSentItems`: keep a copy in the sender's Sent Items.
    pub save_to_sent_items: bool,
    /// What recipients see as the sender, as learnt by the last successful save
    /// and test (`{"name", "email", "differs", "reasons", "message"}`).
    pub recipients_see: Option<serde_json::Value>,
    /// The share (percent, 1–100) of the provider's sending limits mail-dispatch
    /// may use from this mailbox; the rest is left to the people who also send
    /// from it.
    pub limit_percent: u8,
    /// Google: the organization says its Workspace account is on a trial
    /// (lower limits, which the id token does not reveal).
    pub google_trial: bool,
    pub ever_active: bool,
    /// When the grant was last refreshed or obtained (the keep-alive's clock).
    pub last_refreshed_at: Option<DateTime<Utc>>,
    pub connected_at: DateTime<Utc>,
    pub last_test_at: Option<DateTime<Utc>>,
    pub last_test: Option<serde_json::Value>,
    pub last_error: Option<String>,
    pub updated_at: DateTime<Utc>,
}

impl Integration {
    fn from_row(row: &Row) -> Self {
        let provider: String = row.get("provider");
        Integration {
            organization_id: row.get("organization_id"),
            provider: ProviderKind::parse(&provider).unwrap_or(ProviderKind::Default),
            status: IntegrationStatus::parse(row.get("status")),
            account_email: row.get("account_email"),
            account_id: row.get("account_id"),
            account_tenant: row.get("account_tenant"),
            sender_email: row.get("sender_email"),
            sender_name: row.get("sender_name"),
            fallback: Fallback::parse(row.get("fallback")).unwrap_or(Fallback::None),
            save_to_sent_items: row.get("save_to_sent_items"),
            recipients_see: row.get("recipients_see"),
            limit_percent: u8::try_from(row.get::<_, i16>("limit_percent")).unwrap_or(100),
            google_trial: row.get("google_trial"),
            ever_active: row.get("ever_active"),
            last_refreshed_at: row.get("last_refreshed_at"),
            connected_at: row.get("connected_at"),
            last_test_at: row.get("last_test_at"),
            last_test: row.get("last_test"),
            last_error: row.get("last_error"),
            updated_at: row.get("updated_at"),
        }
    }
}

const INTEGRATION_COLUMNS: &str = "organization_id, provider, status, account_email, account_id, \
     account_tenant, sender_email, sender_name, fallback, save_to_sent_items, recipients_see, limit_percent, google_trial, ever_active, last_refreshed_at, connected_at, \
     last_test_at, last_test, last_error, updated_at";

/// The outcome of an OAuth connection, to be stored.
#[derive(Debug)]
pub struct NewConnection {
    pub organization_id: String,
    pub provider: ProviderKind,
    pub account_email: String,
    /// Microsoft `oid`, Google `sub`.
    pub account_id: Option<String>,
    /// Microsoft `tid`, Google `hd`.
    pub account_tenant: Option<String>,
    pub refresh_token: SecretString,
    pub access_token: Option<(SecretString, DateTime<Utc>)>,
    /// The scopes the provider says it granted (space-separated), if it said.
    pub granted_scopes: Option<String>,
}

/// The decrypted tokens of an integration.
#[derive(Debug)]
pub struct StoredTokens {
    pub provider: ProviderKind,
    pub granted_scopes: Option<String>,
    pub refresh_token: Option<SecretString>,
    pub access_token: Option<(SecretString, DateTime<Utc>)>,
    pub last_refreshed_at: Option<DateTime<Utc>>,
}

/// What a refresh lease's holder decided, applied as it releases the lease.
#[derive(Debug)]
pub enum RefreshDecision {
    /// Leave the tokens as they are (another replica refreshed them, or the call
    /// failed transiently).
    Keep,
    /// Store a new access token, and the refresh token: the rotated one when the
    /// provider sent one, else the one used (re-encrypted under the current key,
    /// so that `token_key_id` stays truthful).
    Store {
        access_token: SecretString,
        expires_at: DateTime<Utc>,
        refresh_token: Option<SecretString>,
    },
    /// The provider refused the grant: mark the integration `needs_reauth` and
    /// drop its tokens (a refused refresh token is of no further use; later jobs
    /// then fail fast without asking the provider again).
    Revoked { reason: String },
}

/// What asking for an integration's refresh lease found.
#[derive(Debug)]
pub enum RefreshLease {
    /// The organization has no integration.
    Missing,
    /// This caller holds the lease (`holder`) and may call the token endpoint;
    /// the tokens as they are now.
    Held {
        holder: String,
        tokens: StoredTokens,
    },
    /// Someone else holds it, until `until`; the tokens as they are now (the
    /// holder may have stored fresh ones already).
    Busy {
        tokens: StoredTokens,
        until: DateTime<Utc>,
    },
}

const TOKEN_COLUMNS: &str = "provider, granted_scopes, refresh_token, access_token, \
     access_token_expires_at, last_refreshed_at";

fn ctx(org: &str, column: &str) -> String {
    format!("{org}/{column}")
}

impl Store {
    /// The integration of an organization, if it connected one.
    pub async fn integration(
        &self,
        organization_id: &str,
    ) -> Result<Option<Integration>, StoreError> {
        crate::QueryCounts::bump(&self.counts().config_reads);
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!(
                    "SELECT {INTEGRATION_COLUMNS} FROM integrations WHERE organization_id = $1"
                ),
                &[&organization_id],
            )
            .await?;
        Ok(row.as_ref().map(Integration::from_row))
    }

    /// Every integration, ordered by organization.
    pub async fn list_integrations(&self) -> Result<Vec<Integration>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!("SELECT {INTEGRATION_COLUMNS} FROM integrations ORDER BY organization_id"),
                &[],
            )
            .await?;
        Ok(rows.iter().map(Integration::from_row).collect())
    }

    /// Counts of integrations by status (for the `integrations` gauge).
    pub async fn count_integrations_by_status(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT status, count(*) FROM integrations GROUP BY status",
                &[],
            )
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Stores a new OAuth connection. A reconnect to the same provider keeps the
    /// saved sender; a connection to another provider starts over.
    pub async fn save_connection(&self, c: &NewConnection) -> Result<Integration, StoreError> {
        let org = &c.organization_id;
        let cipher = self.cipher();
        let refresh = cipher.encrypt(&ctx(org, "refresh_token"), &c.refresh_token);
        let (access, expires) = match &c.access_token {
            Some((token, at)) => (
                Some(cipher.encrypt(&ctx(org, "access_token"), token)),
                Some(*at),
            ),
            None => (None, None),
        };
        let client = self.client().await?;
        let row = client
            .query_one(
                &format!(
                    "INSERT INTO integrations (organization_id, provider, status, account_email,
                         refresh_token, access_token, access_token_expires_at, token_key_id, granted_scopes,
                         account_id, account_tenant, last_refreshed_at)
                     VALUES ($1, $2, 'pending_sender', $3, $4, $5, $6, $7, $8, $9, $10, now())
                     ON CONFLICT (organization_id) DO UPDATE SET
                         status = 'pending_sender',
                         account_email = EXCLUDED.account_email,
                         account_id = EXCLUDED.account_id,
                         account_tenant = EXCLUDED.account_tenant,
                         last_refreshed_at = now(),
                         refresh_token = EXCLUDED.refresh_token,
                         access_token = EXCLUDED.access_token,
                         access_token_expires_at = EXCLUDED.access_token_expires_at,
                         token_key_id = EXCLUDED.token_key_id,
                         granted_scopes = EXCLUDED.granted_scopes,
                         sender_email = CASE WHEN integrations.provider = EXCLUDED.provider
                                             THEN integrations.sender_email END,
                         sender_name = CASE WHEN integrations.provider = EXCLUDED.provider
                                            THEN integrations.sender_name END,
                         save_to_sent_items = CASE WHEN integrations.provider = EXCLUDED.provider
                                                   THEN integrations.save_to_sent_items ELSE false END,
                         -- Learnt again by the sender's next test (another account may show another name).
                         recipients_see = NULL,
                         provider = EXCLUDED.provider,
                         connected_at = now(),
                         last_error = NULL,
                         updated_at = now(),
                         refreshing_until = NULL,
                         refresh_holder = NULL
                     RETURNING {INTEGRATION_COLUMNS}"
                ),
                &[
                    org,
                    &c.provider.as_str(),
                    &c.account_email,
                    &refresh,
                    &access,
                    &expires,
                    &cipher.key_id(),
                    &c.granted_scopes,
                    &c.account_id,
                    &c.account_tenant,
                ],
            )
            .await?;
        Ok(Integration::from_row(&row))
    }

    /// Sets what the organization says of its mailbox's sending limits, each
    /// left as it is when `None`: the share (percent, 1–100) of the provider's
    /// limits mail-dispatch may use, and whether its Google Workspace account is
    /// on a trial (Google's lower trial limits then apply). One statement.
    pub async fn save_sending_budget(
        &self,
        organization_id: &str,
        limit_percent: Option<u8>,
        google_trial: Option<bool>,
    ) -> Result<Option<Integration>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!(
                    "UPDATE integrations SET limit_percent = coalesce($2, limit_percent),
                         google_trial = coalesce($3, google_trial), updated_at = now()
                     WHERE organization_id = $1 RETURNING {INTEGRATION_COLUMNS}"
                ),
                &[
                    &organization_id,
                    &limit_percent.map(i16::from),
                    &google_trial,
                ],
            )
            .await?;
        Ok(row.as_ref().map(Integration::from_row))
    }

    /// Saves the sender of an integration (before its test send).
    pub async fn save_sender(
        &self,
        organization_id: &str,
        email: &str,
        name: Option<&str>,
        fallback: Fallback,
    ) -> Result<Option<Integration>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!(
                    "UPDATE integrations SET sender_email = $2, sender_name = $3, fallback = $4, updated_at = now()
                     WHERE organization_id = $1 RETURNING {INTEGRATION_COLUMNS}"
                ),
                &[&organization_id, &email, &name, &fallback.as_str()],
            )
            .await?;
        Ok(row.as_ref().map(Integration::from_row))
    }

    /// Saves how the sender's mail is delivered and seen (after its test was sent):
    /// Graph's `saveToSentItems`, and what recipients see (`None`: unknown).
    pub async fn save_sender_delivery(
        &self,
        organization_id: &str,
        save_to_sent_items: bool,
        recipients_see: Option<&serde_json::Value>,
    ) -> Result<Option<Integration>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!(
                    "UPDATE integrations SET save_to_sent_items = $2, recipients_see = $3, updated_at = now()
                     WHERE organization_id = $1 RETURNING {INTEGRATION_COLUMNS}"
                ),
                &[&organization_id, &save_to_sent_items, &recipients_see],
            )
            .await?;
        Ok(row.as_ref().map(Integration::from_row))
    }

    /// Records a test send; `activate` makes the integration active (the test was sent).
    pub async fn record_test(
        &self,
        organization_id: &str,
        outcome: &serde_json::Value,
        activate: bool,
    ) -> Result<Option<Integration>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!(
                    "UPDATE integrations SET last_test = $2, last_test_at = now(), updated_at = now(),
                         status = CASE WHEN $3 THEN 'active' ELSE status END,
                         ever_active = ever_active OR $3,
                         last_error = CASE WHEN $3 THEN NULL ELSE last_error END
                     WHERE organization_id = $1 RETURNING {INTEGRATION_COLUMNS}"
                ),
                &[&organization_id, outcome, &activate],
            )
            .await?;
        Ok(row.as_ref().map(Integration::from_row))
    }

    /// Marks an integration `needs_reauth` and drops its tokens. Returns whether it
    /// changed (so that the event is published once, not once per job). A refresh
    /// under way loses its lease: what it gets is not stored.
    pub async fn mark_needs_reauth(
        &self,
        organization_id: &str,
        reason: &str,
    ) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let n = client
            .execute(
                "UPDATE integrations SET status = 'needs_reauth', last_error = $2, refresh_token = NULL,
                     access_token = NULL, access_token_expires_at = NULL, updated_at = now(),
                     refreshing_until = NULL, refresh_holder = NULL
                 WHERE organization_id = $1 AND status <> 'needs_reauth'",
                &[&organization_id, &reason],
            )
            .await?;
        Ok(n == 1)
    }

    /// Integrations whose grant has not been refreshed for `idle_for`, oldest first:
    /// the keep-alive refreshes them before the provider expires them for inactivity.
    pub async fn idle_grants(
        &self,
        idle_for: std::time::Duration,
        limit: i64,
    ) -> Result<Vec<(String, ProviderKind)>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT organization_id, provider FROM integrations
                 WHERE status <> 'needs_reauth' AND refresh_token IS NOT NULL
                   AND COALESCE(last_refreshed_at, connected_at) < now() - make_interval(secs => $1::float8)
                 ORDER BY COALESCE(last_refreshed_at, connected_at) LIMIT $2",
                &[&idle_for.as_secs_f64(), &limit],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    r.get(0),
                    ProviderKind::parse(r.get(1)).unwrap_or(ProviderKind::Default),
                )
            })
            .collect())
    }

    /// Deletes an integration and its tokens. Returns the decrypted refresh token
    /// (for revocation at the provider) when there was one.
    pub async fn delete_integration(
        &self,
        organization_id: &str,
    ) -> Result<Option<(ProviderKind, Option<SecretString>)>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "DELETE FROM integrations WHERE organization_id = $1 RETURNING provider, refresh_token",
                &[&organization_id],
            )
            .await?;
        let Some(row) = row else { return Ok(None) };
        let provider = ProviderKind::parse(row.get("provider")).unwrap_or(ProviderKind::Default);
        let refresh: Option<Vec<u8>> = row.get("refresh_token");
        // The row is gone either way: a token that no longer decrypts (lost key,
        // corrupt value) cannot be revoked, which is no reason to fail the disconnect.
        let refresh = refresh.and_then(|b| {
            self.cipher()
                .decrypt(&ctx(organization_id, "refresh_token"), &b)
                .map_err(|e| {
                    tracing::warn!(org.id = organization_id, error = %e, "the disconnected grant's token cannot be decrypted; not revoked");
                })
                .ok()
        });
        Ok(Some((provider, refresh)))
    }

    /// The stored access token and its expiry, decrypted, if there is one.
    pub async fn access_token(
        &self,
        organization_id: &str,
    ) -> Result<Option<(SecretString, DateTime<Utc>)>, StoreError> {
        crate::QueryCounts::bump(&self.counts().token_reads);
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT access_token, access_token_expires_at FROM integrations WHERE organization_id = $1",
                &[&organization_id],
            )
            .await?;
        let Some(row) = row else { return Ok(None) };
        self.decrypt_access(organization_id, &row)
    }

    fn decrypt_access(
        &self,
        organization_id: &str,
        row: &Row,
    ) -> Result<Option<(SecretString, DateTime<Utc>)>, StoreError> {
        let token: Option<Vec<u8>> = row.get("access_token");
        let expires: Option<DateTime<Utc>> = row.get("access_token_expires_at");
        match (token, expires) {
            (Some(t), Some(at)) => Ok(Some((
                self.cipher()
                    .decrypt(&ctx(organization_id, "access_token"), &t)?,
                at,
            ))),
            _ => Ok(None),
        }
    }

    /// The tokens of an integration as they are now, decrypted.
    pub async fn stored_tokens(
        &self,
        organization_id: &str,
    ) -> Result<Option<StoredTokens>, StoreError> {
        crate::QueryCounts::bump(&self.counts().token_reads);
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!("SELECT {TOKEN_COLUMNS} FROM integrations WHERE organization_id = $1"),
                &[&organization_id],
            )
            .await?;
        row.map(|row| self.stored_from_row(organization_id, &row))
            .transpose()
    }

    fn stored_from_row(
        &self,
        organization_id: &str,
        row: &Row,
    ) -> Result<StoredTokens, StoreError> {
        let refresh_token: Option<Vec<u8>> = row.get("refresh_token");
        Ok(StoredTokens {
            provider: ProviderKind::parse(row.get("provider")).unwrap_or(ProviderKind::Default),
            granted_scopes: row.get("granted_scopes"),
            refresh_token: refresh_token
                .map(|b| {
                    self.cipher()
                        .decrypt(&ctx(organization_id, "refresh_token"), &b)
                })
                .transpose()?,
            access_token: self.decrypt_access(organization_id, row)?,
            last_refreshed_at: row.get("last_refreshed_at"),
        })
    }

    /// Takes the integration's refresh lease for `lease` if nobody holds it (or
    /// its holder's lease expired). One statement, no transaction: the row is
    /// locked only for as long as the statement runs, so across all replicas at
    /// most one refresh of an integration is under way, and nobody holds a
    /// connection or a lock while its holder waits for the token endpoint.
    /// The holder ends it with [`Store::finish_refresh`].
    pub async fn take_refresh_lease(
        &self,
        organization_id: &str,
        lease: std::time::Duration,
    ) -> Result<RefreshLease, StoreError> {
        crate::QueryCounts::bump(&self.counts().token_refreshes);
        let holder = uuid::Uuid::new_v4().to_string();
        let client = self.client().await?;
        let taken = client
            .query_opt(
                &format!(
                    "UPDATE integrations
                     SET refreshing_until = now() + make_interval(secs => $3::float8), refresh_holder = $2
                     WHERE organization_id = $1
                       AND (refreshing_until IS NULL OR refreshing_until <= now())
                     RETURNING {TOKEN_COLUMNS}"
                ),
                &[&organization_id, &holder, &lease.as_secs_f64()],
            )
            .await?;
        if let Some(row) = taken {
            // Decrypting may fail (a corrupt or unknown-key token): the lease is
            // given back first, so that the failure is not also a 35 s wait for others.
            return match self.stored_from_row(organization_id, &row) {
                Ok(tokens) => Ok(RefreshLease::Held { holder, tokens }),
                Err(e) => {
                    drop(client);
                    let _ = self
                        .finish_refresh(organization_id, &holder, RefreshDecision::Keep)
                        .await;
                    Err(e)
                }
            };
        }
        let row = client
            .query_opt(
                &format!(
                    "SELECT {TOKEN_COLUMNS}, COALESCE(refreshing_until, now()) AS until
                     FROM integrations WHERE organization_id = $1"
                ),
                &[&organization_id],
            )
            .await?;
        let Some(row) = row else {
            return Ok(RefreshLease::Missing);
        };
        Ok(RefreshLease::Busy {
            tokens: self.stored_from_row(organization_id, &row)?,
            until: row.get("until"),
        })
    }

    /// Applies the decision of a refresh lease's `holder` and releases the lease,
    /// if it still holds it. Returns whether it did: `false` when the lease
    /// expired and someone else took it, or the integration was reconnected,
    /// marked `needs_reauth` or deleted meanwhile (what the holder got is then
    /// stale, and not stored).
    pub async fn finish_refresh(
        &self,
        organization_id: &str,
        holder: &str,
        decision: RefreshDecision,
    ) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let changed = match decision {
            RefreshDecision::Keep => {
                client
                    .execute(
                        "UPDATE integrations SET refreshing_until = NULL, refresh_holder = NULL
                         WHERE organization_id = $1 AND refresh_holder = $2",
                        &[&organization_id, &holder],
                    )
                    .await?
            }
            RefreshDecision::Store {
                access_token,
                expires_at,
                refresh_token,
            } => {
                let cipher = self.cipher();
                let access = cipher.encrypt(&ctx(organization_id, "access_token"), &access_token);
                let refresh = refresh_token
                    .map(|t| cipher.encrypt(&ctx(organization_id, "refresh_token"), &t));
                client
                    .execute(
                        "UPDATE integrations SET access_token = $3, access_token_expires_at = $4,
                             refresh_token = COALESCE($5, refresh_token), token_key_id = $6,
                             last_refreshed_at = now(), updated_at = now(),
                             refreshing_until = NULL, refresh_holder = NULL
                         WHERE organization_id = $1 AND refresh_holder = $2",
                        &[
                            &organization_id,
                            &holder,
                            &access,
                            &expires_at,
                            &refresh,
                            &cipher.key_id(),
                        ],
                    )
                    .await?
            }
            RefreshDecision::Revoked { reason } => {
                client
                    .execute(
                        "UPDATE integrations SET status = 'needs_reauth', last_error = $3,
                             refresh_token = NULL, access_token = NULL, access_token_expires_at = NULL,
                             updated_at = now(), refreshing_until = NULL, refresh_holder = NULL
                         WHERE organization_id = $1 AND refresh_holder = $2",
                        &[&organization_id, &holder, &reason],
                    )
                    .await?
            }
        };
        Ok(changed == 1)
    }
}
