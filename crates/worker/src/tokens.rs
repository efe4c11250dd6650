//! Access tokens: cached in memory, shared through PostgreSQL, refreshed once.
//!
//! Lookup order: this process's memory; then the token stored in PostgreSQL (another
//! replica may have refreshed it); then a refresh under the integration's refresh
//! lease (`Store::take_refresh_lease`), so that across every replica at most one
//! refresh of an integration runs at a time. The lease is a column set by one
//! statement: the token endpoint is called with no connection taken from the pool
//! and no row locked, however slow it is. Whoever finds the lease taken polls the
//! stored token until the holder stored a fresh one (or its lease expired).
//! Within this process a per-organization async mutex makes concurrent jobs of one
//! organization wait for a single refresh instead of polling — 50 jobs with an
//! expired token cause one call to the token endpoint.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use mail_dispatch_domain::ProviderKind;
use mail_dispatch_providers::{RefreshError, TokenService};
use mail_dispatch_store::{
    CipherError, RefreshDecision, RefreshLease, Store, StoreError, StoredTokens,
};
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
    /// The stored token is damaged: no configured key decrypts it, though one
    /// claims to (tampered, truncated or swapped ciphertext). Only a reconnect
    /// helps, so the integration is now `needs_reauth`; `newly` as for `Revoked`.
    #[error("{reason}")]
    Unreadable { reason: String, newly: bool },
    #[error(transparent)]
    Refresh(RefreshError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("organization has no integration")]
    NotConnected,
    /// Another replica kept refreshing the token for longer than its lease allows.
    #[error("another replica is refreshing the organization's token")]
    Busy,
}

/// How much longer than the token endpoint's HTTP timeout a refresh lease lasts:
/// a holder that is alive always finishes (or fails) before its lease expires.
pub const REFRESH_LEASE_MARGIN: Duration = Duration::from_secs(5);
/// First and longest pause between two looks at a token another replica refreshes.
const POLL_FIRST: Duration = Duration::from_millis(50);
const POLL_MAX: Duration = Duration::from_secs(1);

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
    /// How long a refresh lease lasts (see the module documentation).
    lease: Duration,
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
            lease: Duration::from_secs(30) + REFRESH_LEASE_MARGIN,
        }
    }

    /// The same with refresh leases of `lease`: the token endpoint's HTTP timeout
    /// plus [`REFRESH_LEASE_MARGIN`].
    pub fn with_refresh_lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
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
        let outcome = match self.load_or_refresh(org, provider, rejected).await {
            Err(TokenError::Store(StoreError::Cipher(e @ CipherError::Corrupt))) => {
                Err(self.unreadable(org, &e).await)
            }
            other => other,
        };
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
        // Another replica may have refreshed it: the shared copy in PostgreSQL.
        if let Some((token, expires_at)) = self.store.access_token(org).await?
            && self.fresh(&token, expires_at, rejected)
        {
            self.remember(org, &token, expires_at);
            return Ok(token);
        }
        let (token, expires_at) = self.refresh_shared(org, provider, rejected).await?;
        self.remember(org, &token, expires_at);
        Ok(token)
    }

    fn fresh(
        &self,
        token: &SecretString,
        expires_at: DateTime<Utc>,
        rejected: Option<&SecretString>,
    ) -> bool {
        self.usable(expires_at)
            && rejected.is_none_or(|r| r.expose_secret() != token.expose_secret())
    }

    /// The stored access token if it is usable, else a refreshed one: refreshed
    /// here under the lease, or by whoever holds it.
    async fn refresh_shared(
        &self,
        org: &str,
        provider: ProviderKind,
        rejected: Option<&SecretString>,
    ) -> Result<(SecretString, DateTime<Utc>), TokenError> {
        let usable = |tokens: &StoredTokens| {
            tokens
                .access_token
                .as_ref()
                .filter(|(token, at)| self.fresh(token, *at, rejected))
                .cloned()
        };
        let no_grant = || TokenError::Revoked {
            reason: "no refresh token stored (integration needs reauthorization)".into(),
            code: None,
            newly: false,
        };
        // A holder that is alive finishes within its lease; a dead one's lease
        // expires and is taken over. Past twice that, something else is wrong.
        let give_up = tokio::time::Instant::now() + self.lease * 2;
        let mut pause = POLL_FIRST;
        loop {
            if tokio::time::Instant::now() >= give_up {
                return Err(TokenError::Busy);
            }
            match self.store.take_refresh_lease(org, self.lease).await? {
                RefreshLease::Missing => return Err(TokenError::NotConnected),
                RefreshLease::Busy { tokens, until } => {
                    if let Some(found) = usable(&tokens) {
                        return Ok(found);
                    }
                    if tokens.refresh_token.is_none() {
                        return Err(no_grant());
                    }
                    // Not past the lease's end, when it can be taken over.
                    let to_expiry = (until - Utc::now()).to_std().unwrap_or_default();
                    let left = give_up.saturating_duration_since(tokio::time::Instant::now());
                    let wait = pause.min(to_expiry.max(POLL_FIRST)).min(left);
                    tokio::time::sleep(wait).await;
                    pause = (pause * 2).min(POLL_MAX);
                }
                RefreshLease::Held { holder, tokens } => {
                    let lease = Lease::new(&self.store, org, holder);
                    if let Some(found) = usable(&tokens) {
                        lease.release().await;
                        return Ok(found);
                    }
                    let Some(refresh_token) = tokens.refresh_token else {
                        lease.release().await;
                        return Err(no_grant());
                    };
                    let span = tracing::info_span!("token_refresh", %provider, org.id = org, outcome = tracing::field::Empty);
                    let refreshed = self
                        .call_token_endpoint(
                            org,
                            provider,
                            &refresh_token,
                            tokens.granted_scopes.as_deref(),
                        )
                        .instrument(span)
                        .await;
                    match refreshed {
                        Ok(grant) => {
                            tracing::info!(org.id = org, %provider, rotated = grant.refresh_token.is_some(), "access token refreshed");
                            let fresh = (grant.access_token.clone(), grant.expires_at);
                            let stored = lease
                                .finish(RefreshDecision::Store {
                                    access_token: grant.access_token,
                                    expires_at: grant.expires_at,
                                    refresh_token: grant.refresh_token.or(Some(refresh_token)),
                                })
                                .await?;
                            if stored {
                                return Ok(fresh);
                            }
                            // The integration changed under us (reconnected,
                            // flagged, or another replica's refresh after our
                            // lease expired): what it holds now decides, in the
                            // next round (within `give_up`).
                        }
                        Err(RefreshError::Revoked { reason, code }) => {
                            tracing::warn!(org.id = org, %provider, %code, %reason, "grant refused; integration needs reauthorization");
                            if lease
                                .finish(RefreshDecision::Revoked {
                                    reason: reason.clone(),
                                })
                                .await?
                            {
                                return Err(TokenError::Revoked {
                                    reason,
                                    code: Some(code),
                                    newly: true,
                                });
                            }
                        }
                        Err(e) => {
                            lease.release().await;
                            return Err(TokenError::Refresh(e));
                        }
                    }
                }
            }
        }
    }

    /// One call to the token endpoint, counted and logged by outcome.
    async fn call_token_endpoint(
        &self,
        org: &str,
        provider: ProviderKind,
        refresh_token: &SecretString,
        granted_scopes: Option<&str>,
    ) -> Result<mail_dispatch_providers::TokenGrant, RefreshError> {
        let refreshed = self
            .service
            .refresh(provider, refresh_token, granted_scopes)
            .await;
        tracing::Span::current().record("outcome", span_outcome(&refreshed));
        let outcome = match &refreshed {
            Ok(_) => "ok",
            Err(RefreshError::Revoked { .. }) => "revoked",
            Err(e) => refresh_failure(org, provider, e),
        };
        crate::metrics::token_refresh(provider, outcome);
        refreshed
    }

    /// Refreshes the organization's grant if nobody did for `idle_for`, so that a
    /// grant used rarely does not expire for inactivity (Microsoft: 90 days,
    /// AADSTS700082; Google: six months). Under the refresh lease, re-reading
    /// `last_refreshed_at` as it takes it: once across all replicas. A lease held
    /// by someone else means a refresh is under way: not due here.
    pub async fn keep_alive(
        &self,
        org: &str,
        provider: ProviderKind,
        idle_for: Duration,
    ) -> Result<KeepAlive, TokenError> {
        let idle_for = chrono::Duration::from_std(idle_for).unwrap_or(chrono::Duration::days(7));
        let taken = match self.store.take_refresh_lease(org, self.lease).await {
            Err(StoreError::Cipher(e @ CipherError::Corrupt)) => {
                return match self.unreadable(org, &e).await {
                    TokenError::Unreadable {
                        reason,
                        newly: true,
                    } => Ok(KeepAlive::Revoked {
                        reason,
                        code: "undecryptable_token".into(),
                    }),
                    TokenError::Unreadable { .. } => Ok(KeepAlive::NotDue),
                    other => Err(other),
                };
            }
            other => other?,
        };
        let (holder, tokens) = match taken {
            RefreshLease::Missing | RefreshLease::Busy { .. } => return Ok(KeepAlive::NotDue),
            RefreshLease::Held { holder, tokens } => (holder, tokens),
        };
        let lease = Lease::new(&self.store, org, holder);
        let recent = tokens
            .last_refreshed_at
            .is_some_and(|at| at > Utc::now() - idle_for);
        let Some(refresh_token) = tokens.refresh_token.filter(|_| !recent) else {
            lease.release().await;
            return Ok(KeepAlive::NotDue);
        };
        let span = tracing::info_span!("token_refresh", %provider, org.id = org, keepalive = true, outcome = tracing::field::Empty);
        let refreshed = self
            .call_token_endpoint(
                org,
                provider,
                &refresh_token,
                tokens.granted_scopes.as_deref(),
            )
            .instrument(span)
            .await;
        match refreshed {
            Ok(grant) => {
                tracing::info!(org.id = org, %provider, "idle grant refreshed (keep-alive)");
                let stored = lease
                    .finish(RefreshDecision::Store {
                        access_token: grant.access_token.clone(),
                        expires_at: grant.expires_at,
                        refresh_token: grant.refresh_token.or(Some(refresh_token)),
                    })
                    .await?;
                if !stored {
                    return Ok(KeepAlive::NotDue);
                }
                self.remember(org, &grant.access_token, grant.expires_at);
                Ok(KeepAlive::Refreshed {
                    access_token: grant.access_token,
                    expires_at: grant.expires_at,
                })
            }
            Err(RefreshError::Revoked { reason, code }) => {
                tracing::warn!(org.id = org, %provider, %code, %reason, "keep-alive found the grant refused; integration needs reauthorization");
                let flagged = lease
                    .finish(RefreshDecision::Revoked {
                        reason: reason.clone(),
                    })
                    .await?;
                Ok(if flagged {
                    KeepAlive::Revoked { reason, code }
                } else {
                    KeepAlive::NotDue
                })
            }
            Err(e) => {
                lease.release().await;
                Err(TokenError::Refresh(e))
            }
        }
    }

    /// The organization's stored token is damaged ([`CipherError::Corrupt`]):
    /// flags the integration `needs_reauth` with the reason. An unknown key is
    /// not handled here: that is a deployment missing a key, which putting the
    /// key back repairs, and flagging would throw the grant away.
    async fn unreadable(&self, org: &str, e: &CipherError) -> TokenError {
        let reason = format!("the stored token cannot be decrypted: {e}; reconnect");
        match self.store.mark_needs_reauth(org, &reason).await {
            Ok(newly) => {
                if newly {
                    tracing::error!(org.id = org, error = %e, "stored token cannot be decrypted; integration needs reauthorization");
                }
                self.forget(org);
                TokenError::Unreadable { reason, newly }
            }
            Err(e) => TokenError::Store(e),
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

/// A refresh lease this process holds. Ended by [`Lease::finish`] or
/// [`Lease::release`]; if its task is cancelled first, it is released in the
/// background, so that other replicas need not wait for it to expire.
struct Lease {
    store: Store,
    org: String,
    holder: Option<String>,
}

impl Lease {
    fn new(store: &Store, org: &str, holder: String) -> Self {
        Lease {
            store: store.clone(),
            org: org.to_owned(),
            holder: Some(holder),
        }
    }

    /// Applies `decision` if the lease is still ours; whether it was.
    async fn finish(mut self, decision: RefreshDecision) -> Result<bool, StoreError> {
        let holder = self.holder.take().expect("finished once");
        self.store
            .finish_refresh(&self.org, &holder, decision)
            .await
    }

    /// Gives the lease back without changing the tokens.
    async fn release(self) {
        let org = self.org.clone();
        if let Err(e) = self.finish(RefreshDecision::Keep).await {
            tracing::warn!(org.id = %org, error = %e, "could not release a token refresh lease; it expires by itself");
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Some(holder) = self.holder.take() else {
            return;
        };
        let (store, org) = (self.store.clone(), std::mem::take(&mut self.org));
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = store
                    .finish_refresh(&org, &holder, RefreshDecision::Keep)
                    .await;
            });
        }
    }
}
