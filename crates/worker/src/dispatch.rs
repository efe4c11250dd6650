//! One delivery in, one decision out.
//!
//! `Dispatcher::handle` does the reading and writing that deciding needs (ledger,
//! route, provider send, through the [`Ports`]) and returns a [`Decision`]; the
//! runner applies it on the broker. The unit tests (`dispatch/tests.rs`) drive
//! `handle` over in-memory fakes of the ports; `tests/e2e/dispatch.rs` drives it
//! over a test database and the provider stand-ins (no broker, through
//! `mail_dispatch_test_support::Harness`); the other e2e modules run the whole loop.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use mail_dispatch_domain::retry::RetryDecision;
use mail_dispatch_domain::{
    ErrorCode, FailureClass, IntegrationEvent, Job, JobError, JobResult, Mailbox, NeedsReauthEvent,
    OutgoingMessage, ProviderKind, ResultStatus,
};
use mail_dispatch_providers::{Accepted, ThrottleScope};
use mail_dispatch_store::{Claim, ClaimOwner, JobKey, StoreError};

use crate::config::WorkerConfig;
use crate::in_flight::InFlight;
use crate::pacing::{
    Admission, DeferReason, Demand, GOOGLE_PROJECT, PROJECT_PAUSE_FLOOR, Pacer, Permit,
    SendingBudget,
};
use crate::ports::{JobLedger, MailboxSlots, Ports, Routes, SendMail};
use crate::resolver::Route;
use crate::sender::{InProcessRetry, SendFailure};
use crate::services::Services;

#[cfg(test)]
mod tests;

/// A delivery as the dispatcher sees it.
#[derive(Clone, Debug)]
pub struct Incoming {
    pub body: Vec<u8>,
    /// The AMQP `message_id` property (the job id of last resort for invalid jobs).
    pub message_id: Option<String>,
    /// Send attempts made by earlier deliveries of this job.
    pub attempts: u32,
    /// When the job was first seen (or published).
    pub first_seen: DateTime<Utc>,
    /// Not to be attempted before this instant (set when it was delayed).
    pub not_before: Option<DateTime<Utc>>,
    /// Short record of earlier failed attempts, kept for dead letters.
    pub history: String,
    /// How many times the broker delivered this message before (its
    /// `x-delivery-count`): deliveries whose consumer died or handed it back.
    pub delivery_count: u32,
    /// What this delivery's work holds (claim, a send at the provider), for its
    /// runner should it have to drop the work.
    pub in_flight: InFlight,
}

impl Incoming {
    pub fn new(body: Vec<u8>) -> Self {
        Incoming {
            body,
            message_id: None,
            attempts: 0,
            first_seen: Utc::now(),
            not_before: None,
            history: String::new(),
            delivery_count: 0,
            in_flight: InFlight::default(),
        }
    }
}

/// Why a job is dead-lettered.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeadLetter {
    pub reason: ErrorCode,
    pub detail: String,
}

/// A final outcome to publish.
#[derive(Clone, Debug)]
pub struct Finish {
    pub result: JobResult,
    pub dead_letter: Option<DeadLetter>,
    /// Events to publish before the result (`integration.needs_reauth`).
    pub events: Vec<NeedsReauthEvent>,
    /// The ledger row to mark published once the broker confirmed the result.
    pub ledger_key: Option<JobKey>,
}

/// What the ledger keeps of a finished job, so that a redelivery re-publishes
/// everything the first delivery meant to (result, dead letter, events).
#[derive(serde::Serialize, serde::Deserialize)]
struct Recorded {
    result: JobResult,
    #[serde(default)]
    dead_letter: Option<DeadLetter>,
    #[serde(default)]
    events: Vec<NeedsReauthEvent>,
}

impl Recorded {
    fn into_finish(self, key: &JobKey) -> Finish {
        Finish {
            result: self.result,
            dead_letter: self.dead_letter,
            events: self.events,
            ledger_key: Some(key.clone()),
        }
    }
}

/// What the runner does with a delivery.
#[derive(Clone, Debug)]
pub enum Decision {
    /// Publish events, dead letter and result (each confirmed), then ack.
    Finish(Box<Finish>),
    /// Re-publish to a delay queue (confirmed), then ack. Holds no consumer slot.
    Delay {
        wait: Duration,
        attempts: u32,
        reason: DelayReason,
        history: String,
    },
    /// The job id already has a published result: ack and do nothing else.
    Duplicate,
    /// This delivery's claim was taken over by another delivery (its lease ran
    /// out while it was held): that delivery records and publishes the job's
    /// outcome. Ack, publish nothing.
    ClaimLost,
}

/// Why a job waits in a delay queue (the `reason` label of
/// `mail_dispatch_retries_scheduled_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DelayReason {
    /// The provider throttled it.
    Throttled,
    /// The provider failed transiently.
    ProviderUnavailable,
    /// PostgreSQL could not be used: nothing was sent.
    DatabaseUnavailable,
    /// Another worker holds its claim.
    ClaimedElsewhere,
    /// It came back from a shorter tier than its wait.
    RemainingWait,
    /// The pacer deferred it.
    Paced(DeferReason),
}

impl DelayReason {
    /// Every reason, for metrics initialised at zero.
    pub const ALL: [DelayReason; 11] = [
        DelayReason::Throttled,
        DelayReason::ProviderUnavailable,
        DelayReason::DatabaseUnavailable,
        DelayReason::ClaimedElsewhere,
        DelayReason::RemainingWait,
        DelayReason::Paced(DeferReason::OrganizationBusy),
        DelayReason::Paced(DeferReason::MailboxBusy),
        DelayReason::Paced(DeferReason::MailboxRate),
        DelayReason::Paced(DeferReason::MailboxPaused),
        DelayReason::Paced(DeferReason::DailyLimit),
        DelayReason::Paced(DeferReason::ProjectPaused),
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DelayReason::Throttled => "throttled",
            DelayReason::ProviderUnavailable => "provider_unavailable",
            DelayReason::DatabaseUnavailable => "database_unavailable",
            DelayReason::ClaimedElsewhere => "claimed_elsewhere",
            DelayReason::RemainingWait => "remaining_wait",
            DelayReason::Paced(r) => r.as_str(),
        }
    }
}

/// What the pacer said about a job.
enum Paced {
    /// Go ahead, holding the permit while sending (none for a revoked route, or
    /// for a job whose budget is spent: it is not sent, it expires).
    Go(Option<Permit>),
    /// The provider would refuse it (daily limit, pause) and the job's budget is
    /// spent: fail it as the provider would.
    OutOfBudget(DeferReason, ProviderKind),
    /// Not now: delay it.
    Deferred(Decision),
}

/// A waiting period used when the job cannot be handled now for a reason that
/// is not the job's (database unreachable, claim held by another worker).
const BACKOFF_WHEN_BLOCKED: Duration = Duration::from_secs(5);
/// The attempt history carried on delayed copies and dead letters keeps its last
/// this many characters (it travels in a header).
pub(crate) const HISTORY_MAX_CHARS: usize = 1000;
/// A job claimed more often than this in a row without an outcome (each of its
/// workers died or stalled before the send returned) is failed and
/// dead-lettered instead of being sent again: a job that kills its worker would
/// otherwise do so every claim lease, forever, taking every other job in flight
/// on that worker with it.
pub const MAX_CLAIMS_WITHOUT_OUTCOME: i32 = 5;
/// The worker gives a job up this many deliveries before the jobs queue's
/// `x-delivery-limit`, where the broker would dead-letter it silently: the
/// margin leaves room for the give-up's own publishes to fail and be retried.
const DELIVERY_LIMIT_MARGIN: u32 = 5;
/// How long a completed job's publisher is protected from a concurrent
/// redelivery publishing the same result.
const PUBLISH_LEASE: Duration = Duration::from_secs(60);

/// The dispatch use case: the ledger, the routes and the senders it works
/// through, and what only dispatching needs (pacer, published marks, config).
pub struct Dispatcher {
    pub(crate) ledger: Arc<dyn JobLedger>,
    routes: Arc<dyn Routes>,
    senders: Arc<dyn SendMail>,
    slots: Arc<dyn MailboxSlots>,
    pub pacer: Arc<Pacer>,
    /// Results whose publish confirm never came back, since start (see
    /// `mail_dispatch_results_unconfirmed_total`).
    pub results_unconfirmed: std::sync::atomic::AtomicU64,
    pub published: crate::published::PublishedMarks,
    pub config: WorkerConfig,
}

impl Dispatcher {
    /// Over the shared services: the production dispatcher.
    pub fn new(services: &Arc<Services>, config: WorkerConfig) -> Self {
        Dispatcher::with_ports(Ports::of(services), config)
    }

    /// Over any implementation of the ports (the unit tests' fakes).
    pub fn with_ports(ports: Ports, config: WorkerConfig) -> Self {
        Dispatcher {
            ledger: ports.ledger,
            routes: ports.routes,
            senders: ports.senders,
            slots: ports.slots,
            pacer: Pacer::new(config.pacing),
            published: Default::default(),
            results_unconfirmed: Default::default(),
            config,
        }
    }

    /// In-process attempts, never more than the job's remaining budget.
    fn in_process_retry(&self, attempts_made: u32) -> InProcessRetry {
        let remaining = self.config.retry.max_attempts.saturating_sub(attempts_made);
        InProcessRetry {
            attempts: self.config.in_process_attempts.min(remaining).max(1),
            max_wait: self.config.max_in_process_wait,
            backoff: mail_dispatch_domain::Backoff {
                base: Duration::from_millis(100),
                max: self.config.max_in_process_wait,
            },
        }
    }

    /// Decides what to do with one delivery.
    pub async fn handle(&self, incoming: &Incoming) -> Decision {
        let now = Utc::now();
        if let Some(not_before) = incoming.not_before {
            let remaining = (not_before - now).to_std().unwrap_or_default();
            if remaining > Duration::from_millis(500) {
                // Came back from a shorter tier than its wait: wait the rest. No
                // wait of ours is longer than a job's budget or a claim's lease.
                let longest = self.config.retry.max_age.max(self.config.claim_lease);
                return Decision::Delay {
                    wait: remaining.min(longest),
                    attempts: incoming.attempts,
                    reason: DelayReason::RemainingWait,
                    history: incoming.history.clone(),
                };
            }
        }
        let job = match Job::decode(&incoming.body) {
            Ok(job) => job,
            Err(invalid) => return self.invalid(&invalid, incoming, now).await,
        };
        // The runner's span covers the whole delivery; it learns the job here.
        let span = tracing::Span::current();
        span.record("job.id", tracing::field::display(&job.id));
        span.record("org.id", tracing::field::display(&job.organization_id));
        span.record("category", tracing::field::display(&job.category));
        let key = JobKey::new(&job.organization_id, &job.id);
        let give_up_at = self
            .config
            .topology
            .delivery_limit
            .saturating_sub(DELIVERY_LIMIT_MARGIN)
            .max(1);
        if incoming.delivery_count >= give_up_at {
            return self.redelivered_too_often(&job, &key, incoming).await;
        }
        self.handle_valid(job, key, incoming).await
    }

    async fn handle_valid(&self, job: Job, key: JobKey, incoming: &Incoming) -> Decision {
        let route = match self.routes.resolve(&job.organization_id).await {
            Ok(route) => route,
            Err(e) => return self.blocked(&e, &job, &key, None, incoming).await,
        };
        let refused = refused_by_route(&job, &route);
        // Pacing and fairness come before the claim: a deferred job leaves the
        // consumer without touching the ledger. A job the route refuses is not
        // sent, so it takes no room.
        let paced = if refused.is_some() {
            Paced::Go(None)
        } else {
            self.pace(&job, &key, incoming, &route).await
        };
        let (mut permit, deferred_out_of_budget) = match paced {
            Paced::Go(permit) => (permit, None),
            Paced::OutOfBudget(reason, provider) => (None, Some((reason, provider))),
            Paced::Deferred(decision) => return decision,
        };
        let owner = match self.claim(&job, &key, &route, incoming).await {
            Ok(owner) => owner,
            Err(decision) => return decision,
        };
        let held = Some(owner);

        let now = Utc::now();
        let mut result = JobResult::for_job(&job, now);
        if let Some((reason, provider)) = deferred_out_of_budget {
            // The provider would still refuse it, and the job's budget is spent.
            let code = if reason == DeferReason::DailyLimit {
                ErrorCode::QuotaExceeded
            } else {
                ErrorCode::Throttled
            };
            result.provider = Some(provider);
            result.attempts = incoming.attempts;
            result.error = Some(JobError::new(
                code,
                format!(
                    "deferred ({}) past the job's budget (not_after or maximum age)",
                    reason.as_str()
                ),
            ));
            return self.finish(&key, held, result, None, vec![]).await;
        }
        if job.is_expired(now) {
            result.attempts = incoming.attempts;
            result.error = Some(JobError::new(
                ErrorCode::Expired,
                format!(
                    "not sent before not_after ({})",
                    job.not_after.map(|t| t.to_rfc3339()).unwrap_or_default()
                ),
            ));
            return self.finish(&key, held, result, None, vec![]).await;
        }
        if let Some(error) = refused {
            result.provider = Some(route_provider(&route));
            result.attempts = incoming.attempts;
            result.error = Some(error);
            return self.finish(&key, held, result, None, vec![]).await;
        }

        let (provider, message, fallback) = match &route {
            Route::Revoked { provider } => {
                result.provider = Some(*provider);
                result.attempts = incoming.attempts;
                result.error = Some(JobError::new(
                    ErrorCode::AuthRevoked,
                    "the organization's provider grant no longer works; an admin must reconnect it",
                ));
                return self.finish(&key, held, result, None, vec![]).await;
            }
            Route::Provider {
                provider,
                sender,
                save_to_sent_items,
                ..
            } => (
                *provider,
                OutgoingMessage {
                    save_to_sent_items: *save_to_sent_items,
                    ..OutgoingMessage::from_job(&job, sender.clone(), None)
                },
                false,
            ),
            Route::Platform { on_behalf_of: None } => (
                ProviderKind::Default,
                OutgoingMessage::from_job(&job, self.config.default_sender.clone(), None),
                false,
            ),
            Route::Platform {
                on_behalf_of: Some(org_sender),
            } => (
                ProviderKind::Default,
                self.stand_in_message(&job, org_sender),
                true,
            ),
        };
        tracing::Span::current().record("provider", provider.as_str());
        result.provider = Some(provider);
        result.fallback = fallback;
        result.sender = Some(message.from.clone());

        let (sent, still_ours) = self
            .while_claimed(
                &key,
                owner,
                self.senders.send(
                    provider,
                    &job.organization_id,
                    &message,
                    self.in_process_retry(incoming.attempts),
                    &incoming.in_flight,
                ),
            )
            .await;
        // The provider answered: the mailbox's slots are free for the other
        // jobs and replicas before the outcome is recorded and published.
        if let Some(permit) = permit.as_mut() {
            permit.release_mailbox_slots();
        }
        if !still_ours {
            return claim_lost();
        }
        let (outcome, made, retried) = sent;
        let attempts = incoming.attempts.saturating_add(made);
        result.attempts = attempts;
        result.completed_at = Utc::now();
        match outcome {
            Ok(Accepted {
                provider_message_id,
            }) => {
                tracing::info!(attempts, "accepted by the provider");
                if let Some(permit) = permit.as_mut() {
                    permit.mark_sent();
                }
                result.status = ResultStatus::Sent;
                result.provider_message_id = provider_message_id;
                self.finish(&key, held, result, None, vec![]).await
            }
            Err(SendFailure::Store(e)) => {
                // Nothing was sent (tokens could not be read): try again later.
                let _ = self.ledger.release_job(&key, owner).await;
                self.blocked(&e, &job, &key, held, incoming).await
            }
            Err(SendFailure::Unreadable { reason, newly }) => {
                let events = reauth_event(newly, &job.organization_id, provider, &reason);
                let error = JobError::new(ErrorCode::AuthRevoked, reason);
                self.revoked(&job, &key, owner, incoming, &route, result, error, events)
                    .await
            }
            Err(SendFailure::Revoked {
                reason,
                code,
                newly,
            }) => {
                let events = reauth_event(newly, &job.organization_id, provider, &reason);
                let mut error = JobError::new(
                    ErrorCode::AuthRevoked,
                    format!(
                        "the provider refused the organization's grant ({reason}); an admin must reconnect"
                    ),
                );
                error.provider_code = code;
                self.revoked(&job, &key, owner, incoming, &route, result, error, events)
                    .await
            }
            Err(SendFailure::Send(e))
                if e.final_code() == ErrorCode::AuthRevoked
                    && provider != ProviderKind::Default =>
            {
                // The provider refused the grant's scopes (e.g. Gmail's
                // insufficientPermissions): only a reconnect helps. Mark it once,
                // and tell the host application.
                let reason = e
                    .provider_code
                    .clone()
                    .unwrap_or_else(|| "access refused".into());
                let newly = match self
                    .routes
                    .mark_needs_reauth(&job.organization_id, &reason)
                    .await
                {
                    Ok(changed) => changed,
                    Err(err) => {
                        tracing::warn!(error = %err, "could not mark the integration needs_reauth");
                        false
                    }
                };
                let events = reauth_event(newly, &job.organization_id, provider, &reason);
                let error = e.to_job_error(ErrorCode::AuthRevoked);
                self.revoked(&job, &key, owner, incoming, &route, result, error, events)
                    .await
            }
            Err(SendFailure::Send(e)) if e.sending_blocked && provider != ProviderKind::Default => {
                self.sending_blocked(&job, &key, owner, provider, result, &e)
                    .await
            }
            Err(SendFailure::Send(e)) => {
                self.retry_or_fail(&job, &key, owner, incoming, provider, result, e, &retried)
                    .await
            }
        }
    }

    /// Claims the job id in the ledger: `Ok` is the claim's owner, to send
    /// with; `Err` is what to do instead of sending (a duplicate, a stored
    /// outcome to publish again, another worker's claim, a database that cannot
    /// be used, a job that keeps killing its workers, a send that may have
    /// happened).
    async fn claim(
        &self,
        job: &Job,
        key: &JobKey,
        route: &Route,
        incoming: &Incoming,
    ) -> Result<ClaimOwner, Decision> {
        let provider = Some(route_provider(route));
        let claimed = self.ledger.claim_job(key, self.config.claim_lease).await;
        if let Ok(Claim::Acquired { owner, .. } | Claim::Ambiguous { owner }) = &claimed {
            incoming.in_flight.claimed(key, *owner);
        }
        match claimed {
            Ok(Claim::Acquired { claims, owner }) if claims > MAX_CLAIMS_WITHOUT_OUTCOME => {
                tracing::warn!(
                    claims,
                    "job claimed again and again without an outcome; failed"
                );
                let why = format!(
                    "claimed {claims} times without an outcome: each worker that took it \
                     died or stalled before its send returned; not sent again"
                );
                Err(self
                    .give_up(job, key, Some(owner), provider, incoming, why)
                    .await)
            }
            // A take-over (its last worker died or stalled) of a job whose budget
            // is spent: a send now could only be late, and maybe a second one.
            Ok(Claim::Acquired { claims, owner })
                if claims > 1 && self.past_max_age(incoming, Utc::now()) =>
            {
                tracing::warn!(
                    claims,
                    "claim taken over past the job's maximum age; failed"
                );
                let why = format!(
                    "claimed {claims} times without an outcome, and past its maximum age \
                     ({} s); not sent again",
                    self.config.retry.max_age.as_secs()
                );
                Err(self
                    .give_up(job, key, Some(owner), provider, incoming, why)
                    .await)
            }
            Ok(Claim::Acquired { owner, .. }) => Ok(owner),
            Ok(Claim::Ambiguous { owner }) => {
                Err(self.maybe_sent(job, key, owner, provider, incoming).await)
            }
            Ok(Claim::Published) => {
                tracing::info!("job id already has a published result; not sending again");
                metrics::counter!(crate::metrics::DUPLICATES_SKIPPED).increment(1);
                Err(Decision::Duplicate)
            }
            Ok(Claim::Completed(stored)) => Err(republish(stored, key)),
            Ok(Claim::Busy) => {
                // Past its budget, the job is looked at again once the holder's
                // lease is over: by then the holder's outcome is in the ledger, or
                // the take-over above ends the job. Failing it here could give the
                // job a second result, next to the live holder's.
                let now = Utc::now();
                let wait = if after(now, BACKOFF_WHEN_BLOCKED) > self.budget_end(job, incoming) {
                    self.config.claim_lease
                } else {
                    BACKOFF_WHEN_BLOCKED
                };
                tracing::info!(
                    wait_ms = wait.as_millis() as u64,
                    "another worker holds this job id; delaying"
                );
                Err(Decision::Delay {
                    wait,
                    attempts: incoming.attempts,
                    reason: DelayReason::ClaimedElsewhere,
                    history: incoming.history.clone(),
                })
            }
            Err(e) => Err(self.blocked(&e, job, key, None, incoming).await),
        }
    }

    /// An earlier delivery's send of this job was at the provider when its
    /// worker had to drop it: the provider may have accepted the message. It is
    /// not sent again (a second copy would go out unannounced, and Graph does
    /// not deduplicate); the job fails for good with `provider_unavailable`
    /// saying so, and is dead-lettered so that an operator who finds it was not
    /// delivered can replay it deliberately.
    async fn maybe_sent(
        &self,
        job: &Job,
        key: &JobKey,
        owner: ClaimOwner,
        provider: Option<ProviderKind>,
        incoming: &Incoming,
    ) -> Decision {
        tracing::warn!(
            "an earlier send of this job may have been accepted; not sent again, failed"
        );
        let why = "a send of this job was at the provider when its worker had to stop \
                   (shutdown grace over): the provider may have accepted it, so it is not \
                   sent again; check with the recipient before replaying the dead letter"
            .to_owned();
        self.give_up(job, key, Some(owner), provider, incoming, why)
            .await
    }

    /// The broker delivered this message so often that its next hand-back would
    /// come close to the queue's delivery limit, past which the broker
    /// dead-letters it without a result. Whatever kills its consumers comes
    /// before the claim (or the claim would count it): fail it now, once.
    async fn redelivered_too_often(
        &self,
        job: &Job,
        key: &JobKey,
        incoming: &Incoming,
    ) -> Decision {
        let deliveries = incoming.delivery_count.saturating_add(1);
        tracing::warn!(
            deliveries,
            "job redelivered again and again without an outcome; failed"
        );
        match self.ledger.claim_job(key, self.config.claim_lease).await {
            Ok(Claim::Published) => Decision::Duplicate,
            Ok(Claim::Completed(stored)) => republish(stored, key),
            // The holder is alive and the copy it leaves goes through a delay
            // queue, which starts the delivery count again.
            Ok(Claim::Busy) => Decision::Delay {
                wait: BACKOFF_WHEN_BLOCKED,
                attempts: incoming.attempts,
                reason: DelayReason::ClaimedElsewhere,
                history: incoming.history.clone(),
            },
            Ok(Claim::Ambiguous { owner }) => {
                self.maybe_sent(job, key, owner, None, incoming).await
            }
            Ok(Claim::Acquired { owner, .. }) => {
                self.give_up(job, key, Some(owner), None, incoming, too_often(deliveries))
                    .await
            }
            Err(_) => {
                self.give_up(job, key, None, None, incoming, too_often(deliveries))
                    .await
            }
        }
    }

    /// Fails the job for good without sending it, as retries run out do:
    /// `provider_unavailable`, with a dead letter.
    async fn give_up(
        &self,
        job: &Job,
        key: &JobKey,
        held: Option<ClaimOwner>,
        provider: Option<ProviderKind>,
        incoming: &Incoming,
        why: String,
    ) -> Decision {
        let mut result = JobResult::for_job(job, Utc::now());
        result.provider = provider;
        result.attempts = incoming.attempts;
        result.error = Some(JobError::new(ErrorCode::ProviderUnavailable, why.clone()));
        let detail = if incoming.history.is_empty() {
            why
        } else {
            format!("{why}: {}", incoming.history)
        };
        let dead_letter = DeadLetter {
            reason: ErrorCode::ProviderUnavailable,
            detail,
        };
        self.finish(key, held, result, Some(dead_letter), vec![])
            .await
    }

    /// PostgreSQL could not be used, or a stored token's key is not configured:
    /// nothing was sent. The job waits and comes back while the next try falls
    /// within its budget; past `not_after` it fails with `expired`, past its
    /// maximum age with `provider_unavailable` and a dead letter (to be replayed
    /// once the cause is fixed).
    async fn blocked(
        &self,
        e: &StoreError,
        job: &Job,
        key: &JobKey,
        held: Option<ClaimOwner>,
        incoming: &Incoming,
    ) -> Decision {
        let next = after(Utc::now(), BACKOFF_WHEN_BLOCKED);
        if job.not_after.is_some_and(|limit| next > limit) {
            tracing::warn!(error = %e, "database unavailable until the job's not_after; expired");
            let mut result = JobResult::for_job(job, Utc::now());
            result.attempts = incoming.attempts;
            result.error = Some(JobError::new(
                ErrorCode::Expired,
                "the database could not be used, and the next attempt would be after not_after",
            ));
            return self.finish(key, held, result, None, vec![]).await;
        }
        if self.past_max_age(incoming, next) {
            tracing::warn!(error = %e, "database unavailable past the job's maximum age; failed");
            let why = format!(
                "not sent within its maximum age ({} s): the database or the token key could not be used: {e}",
                self.config.retry.max_age.as_secs()
            );
            return self.give_up(job, key, held, None, incoming, why).await;
        }
        if matches!(
            e,
            StoreError::Cipher(mail_dispatch_store::CipherError::UnknownKey(_))
        ) {
            tracing::warn!(error = %e, "a stored token's key is not configured; job delayed");
        } else {
            tracing::warn!(error = %e, "database unavailable; job delayed, not acked until its copy is confirmed");
        }
        Decision::Delay {
            wait: BACKOFF_WHEN_BLOCKED,
            attempts: incoming.attempts,
            reason: DelayReason::DatabaseUnavailable,
            history: incoming.history.clone(),
        }
    }

    /// When the job's budget ends: its `not_after`, or its maximum age after it
    /// was first seen, whichever comes first.
    fn budget_end(&self, job: &Job, incoming: &Incoming) -> DateTime<Utc> {
        let by_age = after(incoming.first_seen, self.config.retry.max_age);
        job.not_after.map_or(by_age, |limit| limit.min(by_age))
    }

    /// Whether the job is older than its maximum age at `at`.
    fn past_max_age(&self, incoming: &Incoming, at: DateTime<Utc>) -> bool {
        at > after(incoming.first_seen, self.config.retry.max_age)
    }

    /// A send failed with `e` after `result.attempts` attempts in all: delay the
    /// job for another attempt, or give up (expired, or retries exhausted, or a
    /// permanent failure), as the retry policy says.
    #[expect(
        clippy::too_many_arguments,
        reason = "the failed send's whole context, passed on from handle_valid"
    )]
    async fn retry_or_fail(
        &self,
        job: &Job,
        key: &JobKey,
        owner: ClaimOwner,
        incoming: &Incoming,
        provider: ProviderKind,
        mut result: JobResult,
        e: mail_dispatch_providers::SendError,
        retried: &[mail_dispatch_providers::SendError],
    ) -> Decision {
        let attempts = result.attempts;
        let mut history = incoming.history.clone();
        for (n, earlier) in (1..).zip(retried) {
            history = append_history(&history, incoming.attempts.saturating_add(n), earlier);
        }
        let history = append_history(&history, attempts, &e);
        let age = (Utc::now() - incoming.first_seen)
            .to_std()
            .unwrap_or_default();
        match self
            .config
            .retry
            .decide(e.class, attempts, age, rand::random::<f64>())
        {
            RetryDecision::RetryAfter(wait) => {
                if let FailureClass::Transient {
                    code: ErrorCode::Throttled,
                    ..
                } = e.class
                    && provider != ProviderKind::Default
                {
                    if e.scope == ThrottleScope::Project && provider == ProviderKind::Google {
                        self.pause_google_project(wait).await;
                    } else {
                        self.pause_mailbox(&job.organization_id, provider, wait)
                            .await;
                    }
                }
                if job
                    .not_after
                    .is_some_and(|limit| after(Utc::now(), wait) > limit)
                {
                    result.error = Some(JobError {
                        code: ErrorCode::Expired,
                        message: format!(
                            "{}; the next attempt would be after not_after",
                            e.message
                        ),
                        ..e.to_job_error(ErrorCode::Expired)
                    });
                    return self.finish(key, Some(owner), result, None, vec![]).await;
                }
                tracing::info!(
                    attempts,
                    wait_ms = wait.as_millis() as u64,
                    code = %e.final_code(),
                    provider_status = e.provider_status,
                    provider_code = e.provider_code.as_deref(),
                    "transient failure; job delayed"
                );
                match self.ledger.release_job(key, owner).await {
                    Ok(true) => {}
                    // Taken over: the new holder's outcome is the job's.
                    Ok(false) => return claim_lost(),
                    Err(err) => {
                        tracing::warn!(error = %err, "could not release the claim; the delayed copy waits for its lease");
                    }
                }
                Decision::Delay {
                    wait,
                    attempts,
                    reason: match e.class {
                        FailureClass::Transient {
                            code: ErrorCode::Throttled,
                            ..
                        } => DelayReason::Throttled,
                        _ => DelayReason::ProviderUnavailable,
                    },
                    history,
                }
            }
            RetryDecision::GiveUp(code) => {
                let exhausted = e.class.is_transient();
                tracing::warn!(
                    attempts,
                    %code,
                    provider_status = e.provider_status,
                    provider_code = e.provider_code.as_deref(),
                    "job failed"
                );
                result.error = Some(e.to_job_error(code));
                let dead_letter = exhausted.then(|| DeadLetter {
                    reason: code,
                    detail: format!("retries exhausted after {attempts} attempts: {history}"),
                });
                self.finish(key, Some(owner), result, dead_letter, vec![])
                    .await
            }
        }
    }

    /// Runs `work` (a send: attempts, waits, a token refresh) while extending the
    /// job's claim every third of its lease, so that a send that takes longer than
    /// the lease is not taken over by a redelivered copy that would send again. If
    /// this worker dies, the extensions stop and the lease runs out as before.
    ///
    /// Returns the work's output and whether the claim is still `owner`'s. If an
    /// extension finds it taken over (the extensions could not reach PostgreSQL
    /// for a whole lease, or the process stalled), the work still runs to its
    /// end (a request at the provider cannot be called back), but its outcome
    /// is not this delivery's to record or publish: the new holder's is.
    async fn while_claimed<T>(
        &self,
        key: &JobKey,
        owner: ClaimOwner,
        work: impl std::future::Future<Output = T>,
    ) -> (T, bool) {
        let lease = self.config.claim_lease;
        let every = (lease / 3).max(Duration::from_millis(100));
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        let mut ours = true;
        tokio::pin!(work);
        loop {
            tokio::select! {
                done = &mut work => return (done, ours),
                _ = tick.tick(), if ours => {
                    match self.ledger.extend_claim(key, owner, lease).await {
                        Ok(true) => {}
                        Ok(false) => {
                            tracing::warn!("the job's claim was taken over while its send ran; its outcome will not be recorded here");
                            ours = false;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "could not extend the job's claim while sending");
                        }
                    }
                }
            }
        }
    }

    /// The platform sender standing in for an organization: its sender's name,
    /// the platform's address, and the organization's address as Reply-To.
    fn stand_in_message(&self, job: &Job, org_sender: &Mailbox) -> OutgoingMessage {
        let default = &self.config.default_sender;
        let from = Mailbox::new(
            default.email.clone(),
            org_sender.name.clone().or(default.name.clone()),
        );
        let reply_to = Mailbox::new(org_sender.email.clone(), org_sender.name.clone());
        OutgoingMessage::from_job(job, from, Some(reply_to))
    }

    /// This job found the organization's grant dead. With `fallback:
    /// platform_sender` it goes out through the platform sender now (contract
    /// §5), and the result says so; otherwise it fails with `auth_revoked`. The
    /// `integration.needs_reauth` event goes out either way.
    #[expect(
        clippy::too_many_arguments,
        reason = "the failed send's whole context, passed on from handle_valid"
    )]
    async fn revoked(
        &self,
        job: &Job,
        key: &JobKey,
        owner: ClaimOwner,
        incoming: &Incoming,
        route: &Route,
        mut result: JobResult,
        error: JobError,
        events: Vec<NeedsReauthEvent>,
    ) -> Decision {
        let Route::Provider {
            sender,
            fallback: mail_dispatch_store::Fallback::PlatformSender,
            ..
        } = route
        else {
            result.error = Some(error);
            return self.finish(key, Some(owner), result, None, events).await;
        };
        let message = self.stand_in_message(job, sender);
        tracing::Span::current().record("provider", ProviderKind::Default.as_str());
        tracing::info!("grant refused; the platform sender stands in (fallback)");
        let (outcome, made, _) = self
            .senders
            .send(
                ProviderKind::Default,
                &job.organization_id,
                &message,
                self.in_process_retry(result.attempts),
                &incoming.in_flight,
            )
            .await;
        result.attempts = result.attempts.saturating_add(made);
        result.provider = Some(ProviderKind::Default);
        result.fallback = true;
        result.sender = Some(message.from.clone());
        result.completed_at = Utc::now();
        match outcome {
            Ok(accepted) => {
                result.status = ResultStatus::Sent;
                result.provider_message_id = accepted.provider_message_id;
            }
            // The event must go out with this job's result: a failure of the
            // stand-in is final for this job rather than delayed without it.
            Err(SendFailure::Send(e)) => {
                result.error = Some(e.to_job_error(e.final_code()));
            }
            Err(_) => result.error = Some(error),
        }
        self.finish(key, Some(owner), result, None, events).await
    }

    /// Asks the pacer for room; for Graph, then for one of the mailbox's
    /// fleet-wide slots.
    async fn pace(&self, job: &Job, key: &JobKey, incoming: &Incoming, route: &Route) -> Paced {
        let (provider, sender_domain, budget) = match route {
            Route::Revoked { .. } => return Paced::Go(None),
            Route::Provider {
                provider,
                sender,
                budget,
                ..
            } => (*provider, sender.email.domain(), *budget),
            Route::Platform { .. } => (ProviderKind::Default, "", SendingBudget::default()),
        };
        let demand = Demand::of(
            sender_domain,
            job.to
                .iter()
                .chain(&job.cc)
                .chain(&job.bcc)
                .map(|m| m.email.domain()),
        );
        let now = Utc::now();
        let org = &job.organization_id;
        let (until, reason) = match self.pacer.admit_message(org, provider, demand, budget, now) {
            Admission::Go(mut permit) if provider == ProviderKind::Microsoft => {
                match self
                    .pacer
                    .take_mailbox_slots(&mut permit, &self.slots)
                    .await
                {
                    Ok(true) => return Paced::Go(Some(permit)),
                    Ok(false) => {
                        drop(permit);
                        let now = Utc::now();
                        (
                            self.pacer.fleet_busy(org, provider, now),
                            DeferReason::MailboxBusy,
                        )
                    }
                    Err(e) => {
                        drop(permit);
                        return Paced::Deferred(self.blocked(&e, job, key, None, incoming).await);
                    }
                }
            }
            Admission::Go(permit) => return Paced::Go(Some(permit)),
            Admission::Defer { until, reason } => (until, reason),
        };
        let now = Utc::now();
        let budget_end = self.budget_end(job, incoming);
        // Wait for room, but not past the job's budget; once the budget is spent,
        // a refusal the provider would give is reported as such (daily limit,
        // pause), and otherwise the job simply expires.
        let wake = if until <= budget_end {
            until
        } else if now < budget_end {
            budget_end
        } else if matches!(
            reason,
            DeferReason::DailyLimit | DeferReason::MailboxPaused | DeferReason::ProjectPaused
        ) {
            return Paced::OutOfBudget(reason, provider);
        } else {
            return Paced::Go(None);
        };
        tracing::debug!(reason = reason.as_str(), "deferred by pacing");
        Paced::Deferred(Decision::Delay {
            wait: (wake - now).to_std().unwrap_or_default(),
            attempts: incoming.attempts,
            reason: DelayReason::Paced(reason),
            history: incoming.history.clone(),
        })
    }

    /// The provider throttled this mailbox: no job of it goes to the provider, on any
    /// replica, until the wait is over.
    async fn pause_mailbox(&self, org: &str, provider: ProviderKind, wait: Duration) {
        let now = Utc::now();
        let until = after(now, wait);
        self.pacer.apply_pause(org, until);
        self.pacer.throttled(org, provider, now);
        if let Err(e) = self.routes.pause_mailbox(org, until, "throttled").await {
            tracing::warn!(error = %e, "could not share the mailbox pause with other replicas");
        }
    }

    /// Gmail refused for the project's quota, which every Google organization of
    /// this deployment shares: none of them goes to Gmail, on any replica, until
    /// the wait (at least [`PROJECT_PAUSE_FLOOR`]) is over.
    async fn pause_google_project(&self, wait: Duration) {
        let until = after(Utc::now(), wait.max(PROJECT_PAUSE_FLOOR));
        self.pacer.apply_pause(GOOGLE_PROJECT, until);
        tracing::warn!(
            wait_ms = (until - Utc::now()).num_milliseconds(),
            "Gmail refused for the Google project's quota; every Google organization paused"
        );
        if let Err(e) = self
            .routes
            .pause_mailbox(GOOGLE_PROJECT, until, "project_throttled")
            .await
        {
            tracing::warn!(error = %e, "could not share the project pause with other replicas");
        }
    }

    /// The provider blocks the organization's mailbox from sending (Exchange's
    /// `ErrorMessageSubmissionBlocked`): the job fails, the mailbox is paused for
    /// `sending_blocked_pause` on every replica (its jobs wait instead of each
    /// meeting the same refusal), and, when this job is the one that found it,
    /// an `integration.sending_blocked` event tells the host application that
    /// the organization's admin must act.
    async fn sending_blocked(
        &self,
        job: &Job,
        key: &JobKey,
        owner: ClaimOwner,
        provider: ProviderKind,
        mut result: JobResult,
        e: &mail_dispatch_providers::SendError,
    ) -> Decision {
        let now = Utc::now();
        let until = after(now, self.config.sending_blocked_pause);
        let org = &job.organization_id;
        // Already paused for most of a block's length: another job of this
        // mailbox found it first and its event is out.
        let newly = self
            .pacer
            .pause_of(org)
            .is_none_or(|p| p < after(now, self.config.sending_blocked_pause / 2));
        self.pacer.apply_pause(org, until);
        if let Err(err) = self
            .routes
            .pause_mailbox(org, until, "sending_blocked")
            .await
        {
            tracing::warn!(error = %err, "could not share the mailbox pause with other replicas");
        }
        tracing::warn!(
            provider_code = e.provider_code.as_deref(),
            pause_secs = self.config.sending_blocked_pause.as_secs(),
            "the provider blocks this mailbox from sending; mailbox paused, job failed"
        );
        let events = if newly {
            vec![IntegrationEvent::sending_blocked(
                org,
                provider,
                &format!(
                    "{} ({}); its notifications wait until {}",
                    e.message,
                    e.provider_code.as_deref().unwrap_or("blocked"),
                    until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                ),
                now,
            )]
        } else {
            vec![]
        };
        result.error = Some(e.to_job_error(ErrorCode::SenderNotAllowed));
        self.finish(key, Some(owner), result, None, events).await
    }

    /// Records the outcome in the ledger as `held`'s, then hands it to the
    /// runner to publish. If the claim is no longer `held`'s (taken over), the
    /// outcome is dropped: the new holder publishes the job's result.
    async fn finish(
        &self,
        key: &JobKey,
        held: Option<ClaimOwner>,
        result: JobResult,
        dead_letter: Option<DeadLetter>,
        events: Vec<NeedsReauthEvent>,
    ) -> Decision {
        let recorded = Recorded {
            result,
            dead_letter,
            events,
        };
        let value = serde_json::to_value(&recorded).expect("outcomes serialize");
        // The outcome is known: record it, retrying briefly through a database
        // blip. If it still fails, publish anyway — the result matters more, and
        // the claim's lease keeps a redelivery from sending again meanwhile.
        // Without a claim (the database failed before one was taken) there is
        // nothing to record it against.
        let mut delay = Duration::from_millis(100);
        for _ in 0..if held.is_some() { 6 } else { 0 } {
            let owner = held.expect("a claim to record against");
            match self
                .ledger
                .complete_job(key, owner, &value, PUBLISH_LEASE)
                .await
            {
                Ok(true) => break,
                Ok(false) => return claim_lost(),
                Err(e) => {
                    tracing::warn!(error = %e, "could not record the outcome; retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
            }
        }
        Decision::Finish(Box::new(recorded.into_finish(key)))
    }

    async fn invalid(
        &self,
        invalid: &mail_dispatch_domain::InvalidJob,
        incoming: &Incoming,
        now: DateTime<Utc>,
    ) -> Decision {
        let result = JobResult::invalid(invalid, incoming.message_id.as_deref(), now);
        if let Some(id) = &result.job_id {
            tracing::Span::current().record("job.id", tracing::field::display(id));
        }
        tracing::warn!(rule = invalid.rule, "invalid job; dead-lettered");
        let dead_letter = Some(DeadLetter {
            reason: ErrorCode::InvalidJob,
            detail: invalid.to_string(),
        });
        // With a readable id, the ledger keeps a redelivery from publishing a second result.
        let ledger_key = match (&invalid.job_id, &invalid.organization_id) {
            (Some(id), Some(org)) => {
                let key = JobKey::new(org, id);
                let value = serde_json::to_value(Recorded {
                    result: result.clone(),
                    dead_letter: dead_letter.clone(),
                    events: vec![],
                })
                .expect("outcomes serialize");
                match self
                    .ledger
                    .complete_unclaimed_job(&key, &value, PUBLISH_LEASE)
                    .await
                {
                    Ok(Claim::Published) => return Decision::Duplicate,
                    Ok(Claim::Acquired { .. } | Claim::Ambiguous { .. } | Claim::Completed(_)) => {
                        Some(key)
                    }
                    Ok(Claim::Busy) => {
                        return Decision::Delay {
                            wait: BACKOFF_WHEN_BLOCKED,
                            attempts: incoming.attempts,
                            reason: DelayReason::ClaimedElsewhere,
                            history: incoming.history.clone(),
                        };
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "could not record the invalid job in the ledger");
                        None
                    }
                }
            }
            _ => None,
        };
        Decision::Finish(Box::new(Finish {
            result,
            dead_letter,
            events: vec![],
            ledger_key,
        }))
    }
}

/// This delivery's claim was taken over by another delivery, which records
/// and publishes the job's outcome: this one publishes nothing.
fn claim_lost() -> Decision {
    tracing::warn!("job claim taken over by another delivery; this delivery's outcome is dropped");
    metrics::counter!(crate::metrics::CLAIMS_LOST).increment(1);
    Decision::ClaimLost
}

fn too_often(deliveries: u32) -> String {
    format!(
        "delivered {deliveries} times without an outcome (each consumer died or handed it \
         back); not sent again"
    )
}

/// The outcome of a job is known, its result not confirmed published: publish
/// the stored result (with its dead letter and events), send nothing.
fn republish(stored: Option<serde_json::Value>, key: &JobKey) -> Decision {
    match stored.map(serde_json::from_value::<Recorded>) {
        Some(Ok(recorded)) => Decision::Finish(Box::new(recorded.into_finish(key))),
        _ => Decision::Duplicate,
    }
}

/// The sender a route names.
fn route_provider(route: &Route) -> ProviderKind {
    match route {
        Route::Revoked { provider } | Route::Provider { provider, .. } => *provider,
        Route::Platform { .. } => ProviderKind::Default,
    }
}

/// What the route's provider would refuse whatever the moment, checked before
/// any call: Gmail takes at most 100 recipients per message through its API
/// (Exchange Online's 500 is the decoder's bound).
fn refused_by_route(job: &Job, route: &Route) -> Option<JobError> {
    let recipients = job.recipient_count();
    match route {
        Route::Provider {
            provider: ProviderKind::Google,
            ..
        } if recipients > mail_dispatch_providers::gmail::MAX_RECIPIENTS => Some(JobError::new(
            ErrorCode::RecipientRejected,
            format!(
                "{recipients} recipients; Gmail takes at most {} per message (to, cc and bcc)",
                mail_dispatch_providers::gmail::MAX_RECIPIENTS
            ),
        )),
        _ => None,
    }
}

/// The `integration.needs_reauth` event, when this job is the one that found the
/// grant refused (`newly`): published once per transition, not once per job.
fn reauth_event(
    newly: bool,
    organization_id: &str,
    provider: ProviderKind,
    reason: &str,
) -> Vec<NeedsReauthEvent> {
    if newly {
        vec![NeedsReauthEvent::new(
            organization_id,
            provider,
            reason,
            Utc::now(),
        )]
    } else {
        vec![]
    }
}

/// `t + d`, or the latest instant there is: nothing of a job's (first seen,
/// waits) may make the arithmetic panic.
fn after(t: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| t.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// The last [`HISTORY_MAX_CHARS`] of an attempt history, cut on a character boundary.
pub(crate) fn cap_history(mut history: String) -> String {
    if history.len() > HISTORY_MAX_CHARS {
        let mut cut = history.len() - HISTORY_MAX_CHARS;
        while !history.is_char_boundary(cut) {
            cut += 1;
        }
        history.drain(..cut);
    }
    history
}

fn append_history(history: &str, attempt: u32, e: &mail_dispatch_providers::SendError) -> String {
    let entry = format!(
        "#{attempt} {} {}{}",
        Utc::now().format("%H:%M:%S"),
        e.final_code(),
        e.provider_status
            .map(|s| format!(" {s}"))
            .unwrap_or_default()
    );
    cap_history(if history.is_empty() {
        entry
    } else {
        format!("{history}; {entry}")
    })
}
