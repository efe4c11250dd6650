//! One send, through the provider a route names: the path shared by worker jobs
//! and the admin API's test send.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use backon::Retryable as _;
use mail_dispatch_domain::{Backoff, ErrorCode, FailureClass, OutgoingMessage, ProviderKind};
use mail_dispatch_providers::{
    Accepted, GmailSender, GraphSender, PlatformSender, RefreshError, SendError, ThrottleScope,
};
use mail_dispatch_store::StoreError;
use tracing::Instrument as _;

use crate::in_flight::InFlight;
use crate::tokens::{TokenError, Tokens};

/// Why a send did not happen.
#[derive(Debug, thiserror::Error)]
pub enum SendFailure {
    /// The provider (or the token endpoint) refused or failed, classified.
    #[error(transparent)]
    Send(SendError),
    /// The grant was refused. `newly`: this call marked the integration `needs_reauth`.
    /// `code`: the provider's (`AADSTS700082`, `invalid_grant`), when it gave one.
    #[error("grant refused: {reason}")]
    Revoked {
        reason: String,
        code: Option<String>,
        newly: bool,
    },
    /// The stored token cannot be decrypted: the integration is now `needs_reauth`
    /// (`newly`: by this call). `reason` says so, and what to do.
    #[error("{reason}")]
    Unreadable { reason: String, newly: bool },
    /// PostgreSQL could not be used (tokens live there), or a stored token's key
    /// is not configured: nothing was sent.
    #[error(transparent)]
    Store(StoreError),
}

impl SendFailure {
    pub fn class(&self) -> Option<FailureClass> {
        match self {
            SendFailure::Send(e) => Some(e.class),
            SendFailure::Revoked { .. } | SendFailure::Unreadable { .. } => {
                Some(FailureClass::Permanent(ErrorCode::AuthRevoked))
            }
            SendFailure::Store(_) => None,
        }
    }
}

fn from_token_error(e: TokenError) -> SendFailure {
    match e {
        TokenError::Revoked {
            reason,
            code,
            newly,
        } => SendFailure::Revoked {
            reason,
            code,
            newly,
        },
        TokenError::Unreadable { reason, newly } => SendFailure::Unreadable { reason, newly },
        TokenError::Store(e) => SendFailure::Store(e),
        TokenError::NotConnected => SendFailure::Send(SendError::permanent(
            ErrorCode::NotConfigured,
            "the organization has no connected provider",
        )),
        // Neither temporary nor the organization's to fix: retrying would not help.
        TokenError::Refresh(e @ RefreshError::Rejected { .. }) => {
            SendFailure::Send(SendError::permanent(
                ErrorCode::ProviderUnavailable,
                format!("could not obtain an access token: {e}"),
            ))
        }
        TokenError::Busy => SendFailure::Send(SendError::new(
            FailureClass::unavailable(None),
            "another replica is still refreshing the organization's access token",
        )),
        // Transient, or the operator's OAuth client: retried within the job's budget.
        TokenError::Refresh(e) => SendFailure::Send(SendError::new(
            FailureClass::unavailable(None),
            format!("could not obtain an access token: {e}"),
        )),
    }
}

/// Short in-process retries of transient failures.
#[derive(Clone, Copy, Debug)]
pub struct InProcessRetry {
    /// Attempts at most in one go (the first included).
    pub attempts: u32,
    /// A wait longer than this is not slept here: the caller delays the job instead.
    pub max_wait: Duration,
    pub backoff: Backoff,
}

/// Full-jitter delays for `backon`, from the domain's backoff math.
struct FullJitter {
    backoff: Backoff,
    made: u32,
}

impl Iterator for FullJitter {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        self.made += 1;
        Some(self.backoff.delay(self.made, rand::random::<f64>()))
    }
}

/// The three senders and the tokens they need.
pub struct Senders {
    pub graph: GraphSender,
    pub gmail: GmailSender,
    pub platform: PlatformSender,
    pub tokens: Arc<Tokens>,
}

impl Senders {
    /// One attempt. For Microsoft and Google, a 401 refreshes the token once and
    /// sends again. A second 401 alone does not prove the grant dead (Graph can
    /// refuse a fresh token for its own reasons): one more refresh decides. If the
    /// provider refuses that refresh, the grant is dead (`Revoked`); if it grants
    /// it, the grant is kept and the job is retried later.
    ///
    /// `watch` learns when a request is at the provider (see [`InFlight`]).
    pub async fn attempt(
        &self,
        provider: ProviderKind,
        org: &str,
        msg: &OutgoingMessage,
        watch: &InFlight,
    ) -> Result<Accepted, SendFailure> {
        let started = Instant::now();
        let span = tracing::info_span!(
            "provider_call",
            %provider,
            org.id = org,
            outcome = tracing::field::Empty,
            elapsed_ms = tracing::field::Empty,
        );
        let result = self
            .attempt_inner(provider, org, msg, watch)
            .instrument(span.clone())
            .await;
        let outcome = match &result {
            Ok(_) => "accepted",
            Err(SendFailure::Send(e)) => match e.class {
                FailureClass::Transient {
                    code: ErrorCode::Throttled,
                    ..
                } => {
                    metrics::counter!(crate::metrics::PROVIDER_THROTTLED, "provider" => provider.as_str()).increment(1);
                    "throttled"
                }
                FailureClass::Transient { .. } => {
                    if e.maybe_sent {
                        let cause = if e.provider_status == Some(504) {
                            "gateway_timeout"
                        } else {
                            "no_answer"
                        };
                        crate::metrics::ambiguous_send(provider, cause);
                        tracing::warn!(%provider, cause, "no answer tells whether the provider accepted the message; a retry may send it twice");
                    }
                    "transient"
                }
                FailureClass::Unauthorized => "unauthorized",
                FailureClass::Permanent(_) => "rejected",
            },
            Err(SendFailure::Revoked { .. } | SendFailure::Unreadable { .. }) => "revoked",
            Err(SendFailure::Store(_)) => "store_unavailable",
        };
        crate::metrics::send_attempt(provider, outcome, started.elapsed());
        span.record("outcome", outcome);
        span.record("elapsed_ms", started.elapsed().as_millis() as u64);
        result
    }

    async fn attempt_inner(
        &self,
        provider: ProviderKind,
        org: &str,
        msg: &OutgoingMessage,
        watch: &InFlight,
    ) -> Result<Accepted, SendFailure> {
        if provider == ProviderKind::Default {
            return self
                .send_with(provider, &secrecy::SecretString::from(""), msg, watch)
                .await
                .map_err(SendFailure::Send);
        }
        let token = self
            .tokens
            .access_token(org, provider, None)
            .await
            .map_err(from_token_error)?;
        match self.send_with(provider, &token, msg, watch).await {
            Err(e) if e.class == FailureClass::Unauthorized => {
                tracing::info!(org.id = org, %provider, "access token refused (401); refreshing once");
                let fresh = self
                    .tokens
                    .access_token(org, provider, Some(&token))
                    .await
                    .map_err(from_token_error)?;
                match self.send_with(provider, &fresh, msg, watch).await {
                    Err(e) if e.class == FailureClass::Unauthorized => {
                        tracing::warn!(org.id = org, %provider, "a fresh access token was refused too; confirming the grant with one more refresh");
                        self.tokens
                            .access_token(org, provider, Some(&fresh))
                            .await
                            .map_err(from_token_error)?;
                        Err(SendFailure::Send(SendError {
                            class: FailureClass::unavailable(None),
                            message: format!(
                                "{} (two fresh access tokens refused, but the grant still refreshes: retried later)",
                                e.message
                            ),
                            ..e
                        }))
                    }
                    other => other.map_err(SendFailure::Send),
                }
            }
            other => other.map_err(SendFailure::Send),
        }
    }

    /// One request to the provider. From the moment it is handed over until an
    /// answer says the message was refused, `watch` knows it may be accepted.
    async fn send_with(
        &self,
        provider: ProviderKind,
        token: &secrecy::SecretString,
        msg: &OutgoingMessage,
        watch: &InFlight,
    ) -> Result<Accepted, SendError> {
        watch.handed_to(provider);
        let result = match provider {
            ProviderKind::Microsoft => self.graph.send(token, msg).await,
            ProviderKind::Google => self.gmail.send(token, msg).await,
            ProviderKind::Default => self.platform.send(msg).await,
        };
        if let Err(e) = &result
            && !e.maybe_sent
        {
            watch.refused();
        }
        result
    }

    /// Attempts with short in-process retries of transient failures whose wait
    /// fits `retry.max_wait`. Returns the outcome, the number of attempts made
    /// (throttled requests, which the provider declined, not counted), and
    /// the failures of the attempts that were retried (for the attempt history).
    pub async fn send(
        &self,
        provider: ProviderKind,
        org: &str,
        msg: &OutgoingMessage,
        retry: InProcessRetry,
    ) -> (Result<Accepted, SendFailure>, u32, Vec<SendError>) {
        self.send_watched(provider, org, msg, retry, &InFlight::default())
            .await
    }

    /// [`Senders::send`] for a job's delivery, whose `watch` learns when a
    /// request is at the provider.
    pub async fn send_watched(
        &self,
        provider: ProviderKind,
        org: &str,
        msg: &OutgoingMessage,
        retry: InProcessRetry,
        watch: &InFlight,
    ) -> (Result<Accepted, SendFailure>, u32, Vec<SendError>) {
        let attempts = AtomicU32::new(0);
        let retried = std::sync::Mutex::new(Vec::new());
        let backoff = FullJitter {
            backoff: retry.backoff,
            made: 0,
        }
        .take(retry.attempts.saturating_sub(1) as usize);
        let result = (|| async {
            let result = self.attempt(provider, org, msg, watch).await;
            // A throttle (429) is the provider declining to take the request
            // now, not an attempt at the message: it does not use up the
            // job's attempts.
            let throttled = matches!(
                result.as_ref().err().and_then(SendFailure::class),
                Some(FailureClass::Transient {
                    code: ErrorCode::Throttled,
                    ..
                })
            );
            if !throttled {
                attempts.fetch_add(1, Ordering::Relaxed);
            }
            result
        })
        .retry(backoff)
        .sleep(tokio::time::sleep)
        .when(|e: &SendFailure| match e.class() {
            // A project-wide throttle is for the dispatcher to pause every
            // organization of the project with, not for this job to test again.
            _ if matches!(e, SendFailure::Send(se) if se.scope == ThrottleScope::Project && se.class.is_transient()) => false,
            Some(FailureClass::Transient { retry_after, .. }) => retry_after.is_none_or(|d| d <= retry.max_wait),
            _ => false,
        })
        .adjust(|e: &SendFailure, planned| match (e.class(), planned) {
            (Some(FailureClass::Transient { retry_after: Some(after), .. }), Some(planned)) => Some(after.max(planned)),
            (_, planned) => planned.map(|d| d.min(retry.max_wait)),
        })
        .notify(|e: &SendFailure, wait| {
            if let SendFailure::Send(e) = e {
                retried.lock().expect("poisoned").push(e.clone());
            }
            tracing::info!(org.id = org, %provider, wait_ms = wait.as_millis() as u64, "transient failure; retrying in process");
        })
        .await;
        let retried = retried.into_inner().expect("poisoned");
        (result, attempts.load(Ordering::Relaxed), retried)
    }
}
