//! Access tokens: cached in memory, shared through PostgreSQL, refreshed once.
//!
//! Lookup order: this process's memory; then the token stored in PostgreSQL (another
//! replica may have refreshed it); then a refresh, done with the integration's row
//! locked so that across every replica at most one refresh of an integration runs
//! at a time. Within this process a per-organization async mutex makes concurrent
//! jobs of one organization wait for a single refresh instead of queueing on the
//! row lock — 50 jobs with an expired token cause one call to the token endpoint.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use mail_dispatch_domain::ProviderKind;
use mail_dispatch_providers::{RefreshError, TokenService};
use mail_dispatch_store::{RefreshDecision, Store, StoreError};
use secrecy::{ExposeSecret, SecretString};
use tracing::Instrument as _;

/// Why no usable access token could be had.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// The provider refused the grant. `newly` is true for the one caller that
    /// saw the refusal and marked the integration `needs_reauth` (it publishes the event).
    #[error("grant refused: {reason}")]
    Revoked {
        reason: String,
        code: Option<String>,
        newly: bool,
    },
    #[error(transparent)]
    Refresh(RefreshError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("organization has no integration")]
    NotConnected,
}

#[derive(Clone)]
struct Cached {
    token: SecretString,
    expires_at: DateTime<Utc>,
}

/// What a keep-alive refresh did.
#[derive(Debug)]
pub enum KeepAlive {
    /// Refreshed recently (by any replica), or nothing to refresh.
    NotDue,
    Refreshed {
        access_token: SecretString,
        expires_at: DateTime<Utc>,
    },
    /// The provider refused the grant: the integration is now `needs_reauth`.
    Revoked { reason: String, code: String },
}

/// The outcome a refresh span records.
fn span_outcome<T>(refreshed: &Result<T, RefreshError>) -> &'static str {
    match refreshed {
        Ok(_) => "ok",
        Err(RefreshError::Revoked { .. }) => "revoked",
        Err(_) => "error",
    }
}

/// Logs a failed refresh where its owner will see it; returns the metric outcome.
fn refresh_failure(org: &str, provider: ProviderKind, e: &RefreshError) -> &'static str {
    match e {
        RefreshError::Misconfigured { .. } => {
            tracing::error!(%provider, error = %e, "OAuth client misconfigured: an operator must fix it");
            "misconfigured"
        }
        RefreshError::Rejected { .. } => {
            tracing::error!(org.id = org, %provider, error = %e, "token endpoint refused the refresh request; not retried");
            "rejected"
        }
        _ => {
            tracing::warn!(org.id = org, %provider, error = %e, "token refresh failed");
            "error"
        }
    }
}

/// The token cache holds at most this many organizations' tokens.
pub const MAX_CACHED_TOKENS: usize = 100_000;

/// The token cache of one process.
pub struct Tokens {
    store: Store,
    service: TokenService,
    margin: chrono::Duration,
    cache: Mutex<HashMap<String, Cached>>,
    refresh_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Past this many cached tokens, the cache makes room (see `remember`).
    max_entries: usize,
}

impl Tokens {
    pub fn new(store: Store, service: TokenService, margin: Duration) -> Self {
        Tokens {
            store,
            service,
            margin: chrono::Duration::from_std(margin).unwrap_or(chrono::Duration::minutes(2)),
            cache: Mutex::new(HashMap::new()),
            refresh_locks: Mutex::new(HashMap::new()),
            max_entries: MAX_CACHED_TOKENS,
        }
    }

    /// The same with another bound on the cache (tests).
    pub fn with_max_entries(mut self, max_entries: usize) -> Self {
        self.max_entries = max_entries.max(1);
        self
    }

    /// How many tokens and refresh locks are held.
    pub fn entries(&self) -> (usize, usize) {
        (
            self.cache.lock().expect("poisoned").len(),
            self.refresh_locks.lock().expect("poisoned").len(),
        )
    }

    pub fn service(&self) -> &TokenService {
        &self.service
    }

    fn usable(&self, expires_at: DateTime<Utc>) -> bool {
        expires_at - self.margin > Utc::now()
    }

    fn cached(&self, org: &str, rejected: Option<&SecretString>) -> Option<SecretString> {
        let cache = self.cache.lock().expect("poisoned");
        let c = cache.get(org)?;
        let is_rejected = rejected.is_some_and(|r| r.expose_secret() == c.token.expose_secret());
        (self.usable(c.expires_at) && !is_rejected).then(|| c.token.clone())
    }

    /// Forgets an organization's token (its integration changed).
    pub fn forget(&self, org: &str) {
        self.cache.lock().expect("poisoned").remove(org);
    }

    /// Forgets every token.
    pub fn forget_all(&self) {
        self.cache.lock().expect("poisoned").clear();
    }

    /// A usable access token for the organization. `rejected` is a token the
    /// provider just refused with 401: it is refreshed even if not yet expired.
    pub async fn access_token(
        &self,
        org: &str,
        provider: ProviderKind,
        rejected: Option<&SecretString>,
    ) -> Result<SecretString, TokenError> {
        if let Some(t) = self.cached(org, rejected) {
            return Ok(t);
        }
        let lock = self
            .refresh_locks
            .lock()
            .expect("poisoned")
            .entry(org.to_owned())
            .or_default()
            .clone();
        let guard = lock.lock().await;
        let outcome = self.load_or_refresh(org, provider, rejected).await;
        drop(guard);
        let mut locks = self.refresh_locks.lock().expect("poisoned");
        // Nobody else waits on it (the map's and this clone are the only ones).
        if Arc::strong_count(&lock) == 2 {
            locks.remove(org);
        }
        outcome
    }

    async fn load_or_refresh(
        &self,
        org: &str,
        provider: ProviderKind,
        rejected: Option<&SecretString>,
    ) -> Result<SecretString, TokenError> {
        // Another task of this process may have refreshed while we waited.
        if let Some(t) = self.cached(org, rejected) {
            return Ok(t);
        }
        let is_rejected =
            |t: &SecretString| rejected.is_some_and(|r| r.expose_secret() == t.expose_secret());
        // Another replica may have refreshed it: the shared copy in PostgreSQL.
        if let Some((token, expires_at)) = self.store.access_token(org).await?
            && self.usable(expires_at)
            && !is_rejected(&token)
        {
            self.remember(org, &token, expires_at);
            return Ok(token);
        }
        let outcome = self
            .store
            .refresh_locked(org, |stored| async move {
                if let Some((token, expires_at)) = stored.access_token
                    && self.usable(expires_at)
                    && !is_rejected(&token)
                {
                    return (RefreshDecision::Keep, Ok((token, expires_at)));
                }
                let Some(refresh_token) = stored.refresh_token else {
                    return (
                        RefreshDecision::Keep,
                        Err(TokenError::Revoked {
                            reason: "no refresh token stored (integration needs reauthorization)".into(),
                            code: None,
                            newly: false,
                        }),
                    );
                };
                let span = tracing::info_span!("token_refresh", %provider, org.id = org, outcome = tracing::field::Empty);
                let refreshed = self
                    .service
                    .refresh(provider, &refresh_token, stored.granted_scopes.as_deref())
                    .instrument(span.clone())
                    .await;
                span.record("outcome", span_outcome(&refreshed));
                match refreshed {
                    Ok(grant) => {
                        crate::metrics::token_refresh(provider, "ok");
                        tracing::info!(org.id = org, %provider, rotated = grant.refresh_token.is_some(), "access token refreshed");
                        let value = Ok((grant.access_token.clone(), grant.expires_at));
                        (
                            RefreshDecision::Store {
                                access_token: grant.access_token,
                                expires_at: grant.expires_at,
                                refresh_token: grant.refresh_token,
                            },
                            value,
                        )
                    }
                    Err(RefreshError::Revoked { reason, code }) => {
                        crate::metrics::token_refresh(provider, "revoked");
                        tracing::warn!(org.id = org, %provider, %code, %reason, "grant refused; integration needs reauthorization");
                        (
                            RefreshDecision::Revoked { reason: reason.clone() },
                            Err(TokenError::Revoked { reason, code: Some(code), newly: true }),
                        )
                    }
                    Err(e) => {
                        crate::metrics::token_refresh(provider, refresh_failure(org, provider, &e));
                        (RefreshDecision::Keep, Err(TokenError::Refresh(e)))
                    }
                }
            })
            .await?;
        match outcome {
            None => Err(TokenError::NotConnected),
            Some(Ok((token, expires_at))) => {
                self.remember(org, &token, expires_at);
                Ok(token)
            }
            Some(Err(e)) => Err(e),
        }
    }

    /// Refreshes the organization's grant if nobody did for `idle_for`, so that a
    /// grant used rarely does not expire for inactivity (Microsoft: 90 days,
    /// AADSTS700082; Google: six months). The row lock and the re-read of
    /// `last_refreshed_at` under it make this happen once across all replicas.
    pub async fn keep_alive(
        &self,
        org: &str,
        provider: ProviderKind,
        idle_for: Duration,
    ) -> Result<KeepAlive, TokenError> {
        let idle_for = chrono::Duration::from_std(idle_for).unwrap_or(chrono::Duration::days(7));
        let outcome = self
            .store
            .refresh_locked(org, |stored| async move {
                let recent = stored
                    .last_refreshed_at
                    .is_some_and(|at| at > Utc::now() - idle_for);
                let Some(refresh_token) = stored.refresh_token.filter(|_| !recent) else {
                    return (RefreshDecision::Keep, Ok(KeepAlive::NotDue));
                };
                let span = tracing::info_span!("token_refresh", %provider, org.id = org, keepalive = true, outcome = tracing::field::Empty);
                let refreshed = self
                    .service
                    .refresh(provider, &refresh_token, stored.granted_scopes.as_deref())
                    .instrument(span.clone())
                    .await;
                span.record("outcome", span_outcome(&refreshed));
                match refreshed {
                    Ok(grant) => {
                        crate::metrics::token_refresh(provider, "ok");
                        tracing::info!(org.id = org, %provider, "idle grant refreshed (keep-alive)");
                        let value = Ok(KeepAlive::Refreshed {
                            access_token: grant.access_token.clone(),
                            expires_at: grant.expires_at,
                        });
                        (
                            RefreshDecision::Store {
                                access_token: grant.access_token,
                                expires_at: grant.expires_at,
                                refresh_token: grant.refresh_token,
                            },
                            value,
                        )
                    }
                    Err(RefreshError::Revoked { reason, code }) => {
                        crate::metrics::token_refresh(provider, "revoked");
                        tracing::warn!(org.id = org, %provider, %code, %reason, "keep-alive found the grant refused; integration needs reauthorization");
                        (
                            RefreshDecision::Revoked {
                                reason: reason.clone(),
                            },
                            Ok(KeepAlive::Revoked { reason, code }),
                        )
                    }
                    Err(e) => {
                        crate::metrics::token_refresh(provider, refresh_failure(org, provider, &e));
                        (RefreshDecision::Keep, Err(TokenError::Refresh(e)))
                    }
                }
            })
            .await?;
        match outcome {
            None => Ok(KeepAlive::NotDue),
            Some(Ok(KeepAlive::Refreshed {
                access_token,
                expires_at,
            })) => {
                self.remember(org, &access_token, expires_at);
                Ok(KeepAlive::Refreshed {
                    access_token,
                    expires_at,
                })
            }
            Some(other) => other,
        }
    }

    fn remember(&self, org: &str, token: &SecretString, expires_at: DateTime<Utc>) {
        let mut cache = self.cache.lock().expect("poisoned");
        if cache.len() >= self.max_entries {
            // Expired tokens first; then the half that expires soonest.
            cache.retain(|_, c| self.usable(c.expires_at));
            if cache.len() >= self.max_entries {
                let mut expiries: Vec<_> = cache.values().map(|c| c.expires_at).collect();
                expiries.sort_unstable();
                let cutoff = expiries[expiries.len() / 2];
                cache.retain(|_, c| c.expires_at > cutoff);
            }
        }
        cache.insert(
            org.to_owned(),
            Cached {
                token: token.clone(),
                expires_at,
            },
        );
    }
}
