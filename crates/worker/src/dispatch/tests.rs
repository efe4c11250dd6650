//! `Dispatcher::handle` over in-memory fakes of its ports: each delivery is driven
//! to its decision with no broker, no database and no provider. Nothing sleeps
//! but the fleet-slot tests (a fraction of a second, and `FLEET_SLOT_WAIT`
//! once). The same paths against PostgreSQL and the provider stand-ins are in
//! `tests/e2e/dispatch.rs`; the broker side of each decision in the other e2e
//! modules.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::Utc;
use mail_dispatch_domain::{
    EmailAddress, ErrorCode, FailureClass, Mailbox, ProviderKind, ResultStatus,
};
use mail_dispatch_providers::SendError;
use mail_dispatch_store::{ClaimOwner, Fallback, JobKey};
use serde_json::{Value, json};

use super::{BACKOFF_WHEN_BLOCKED, Decision, DelayReason, Dispatcher, Finish, Incoming};
use crate::WorkerConfig;
use crate::fakes::{Entry, FakeLedger, FakeRoutes, FakeSenders, FakeSlots};
use crate::pacing::FLEET_SLOT_WAIT;
use crate::pacing::{Admission, DeferReason};
use crate::ports::{JobLedger, MailboxSlots, Ports};
use crate::resolver::Route;
use crate::sender::SendFailure;

const PLATFORM: &str = "no-reply@platform.example";
/// The owner of a claim this dispatcher did not take.
const ANOTHER_WORKER: ClaimOwner = ClaimOwner(-1);

struct Fixture {
    ledger: Arc<FakeLedger>,
    routes: Arc<FakeRoutes>,
    senders: Arc<FakeSenders>,
    slots: Arc<FakeSlots>,
    dispatcher: Dispatcher,
}

fn config() -> WorkerConfig {
    let platform = Mailbox::new(
        EmailAddress::parse(PLATFORM).unwrap(),
        Some("Platform".into()),
    );
    WorkerConfig::new("amqp://unused".into(), platform)
}

fn fixture() -> Fixture {
    fixture_with(config())
}

fn fixture_with(config: WorkerConfig) -> Fixture {
    let ledger = Arc::new(FakeLedger::default());
    let routes = Arc::new(FakeRoutes::default());
    let senders = Arc::new(FakeSenders::default());
    let slots = Arc::new(FakeSlots::default());
    let ports = Ports {
        ledger: ledger.clone(),
        routes: routes.clone(),
        senders: senders.clone(),
        slots: slots.clone(),
    };
    Fixture {
        dispatcher: Dispatcher::with_ports(ports, config),
        ledger,
        routes,
        senders,
        slots,
    }
}

impl Fixture {
    async fn handle(&self, job: &Value) -> Decision {
        self.dispatcher.handle(&incoming(job)).await
    }

    fn sent(&self) -> usize {
        self.senders.sent().len()
    }
}

fn job(org: &str) -> Value {
    json!({
        "id": uuid_like(),
        "organization_id": org,
        "to": [{"email": "alice@example.com"}],
        "subject": "Nouvelle tâche",
        "text": "Bonjour",
    })
}

fn uuid_like() -> String {
    use std::sync::atomic::AtomicU64;
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!("job-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

fn incoming(job: &Value) -> Incoming {
    Incoming::new(serde_json::to_vec(job).unwrap())
}

fn key(job: &Value) -> JobKey {
    JobKey::new(
        job["organization_id"].as_str().unwrap(),
        job["id"].as_str().unwrap(),
    )
}

fn mailbox(email: &str, name: &str) -> Mailbox {
    Mailbox::new(EmailAddress::parse(email).unwrap(), Some(name.into()))
}

fn microsoft(fallback: Fallback) -> Route {
    Route::Provider {
        provider: ProviderKind::Microsoft,
        sender: mailbox("ops@acme.example", "Acme"),
        fallback,
        save_to_sent_items: false,
        budget: Default::default(),
    }
}

fn finished(decision: Decision) -> Finish {
    match decision {
        Decision::Finish(f) => *f,
        other => panic!("expected a final outcome, got {other:?}"),
    }
}

/// `(wait, attempts, reason)` of a delay.
fn delayed(decision: Decision) -> (Duration, u32, DelayReason) {
    match decision {
        Decision::Delay {
            wait,
            attempts,
            reason,
            ..
        } => (wait, attempts, reason),
        other => panic!("expected a delay, got {other:?}"),
    }
}

fn recorded_status(ledger: &FakeLedger, key: &JobKey) -> Value {
    match ledger.get(key) {
        Some(Entry::Completed { recorded, .. }) => recorded["result"]["status"].clone(),
        other => panic!("expected a recorded outcome, got {other:?}"),
    }
}

fn send_error(class: FailureClass) -> Result<mail_dispatch_providers::Accepted, SendFailure> {
    Err(SendFailure::Send(SendError::new(
        class,
        "the provider said no",
    )))
}

#[tokio::test]
async fn an_invalid_job_fails_is_dead_lettered_and_its_redelivery_is_a_duplicate() {
    let f = fixture();
    let mut bad = job("org_1");
    bad["to"] = json!([]);

    let done = finished(f.handle(&bad).await);
    assert_eq!(done.result.status, ResultStatus::Failed);
    assert_eq!(done.result.error.unwrap().code, ErrorCode::InvalidJob);
    assert_eq!(done.dead_letter.unwrap().reason, ErrorCode::InvalidJob);
    assert_eq!(done.ledger_key, Some(key(&bad)), "its id was readable");
    assert_eq!(recorded_status(&f.ledger, &key(&bad)), "failed");
    assert_eq!(f.sent(), 0);

    f.ledger.mark_published(&[key(&bad)]).await.unwrap();
    assert!(matches!(f.handle(&bad).await, Decision::Duplicate));
}

#[tokio::test]
async fn a_body_that_is_not_json_fails_under_its_message_id() {
    let f = fixture();
    let mut delivery = Incoming::new(b"{not json".to_vec());
    delivery.message_id = Some("amqp-id-7".into());
    let done = finished(f.dispatcher.handle(&delivery).await);
    assert_eq!(done.result.job_id.as_deref(), Some("amqp-id-7"));
    assert_eq!(done.result.error.unwrap().code, ErrorCode::InvalidJob);
    assert!(done.dead_letter.is_some());
    assert_eq!(done.ledger_key, None, "no organization to key it by");
}

#[tokio::test]
async fn an_accepted_send_finishes_as_sent_from_the_organizations_mailbox() {
    let f = fixture();
    f.routes.set("org_ms", microsoft(Fallback::None));
    let j = job("org_ms");

    let done = finished(f.handle(&j).await);
    let result = done.result;
    assert_eq!(result.status, ResultStatus::Sent, "{result:?}");
    assert_eq!(result.provider, Some(ProviderKind::Microsoft));
    assert!(!result.fallback);
    assert_eq!(result.sender.unwrap().email.as_str(), "ops@acme.example");
    assert_eq!(result.attempts, 1);
    assert_eq!(result.provider_message_id.as_deref(), Some("fake-1"));
    assert!(result.error.is_none());
    assert!(done.dead_letter.is_none() && done.events.is_empty());
    assert_eq!(done.ledger_key, Some(key(&j)));
    assert_eq!(recorded_status(&f.ledger, &key(&j)), "sent");

    let sent = f.senders.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].provider, ProviderKind::Microsoft);
    assert_eq!(sent[0].organization_id, "org_ms");
    assert_eq!(sent[0].message.to[0].email.as_str(), "alice@example.com");
}

/// The organization's Sent Items choice reaches the provider with its message.
#[tokio::test]
async fn the_organizations_sent_items_choice_goes_with_the_message() {
    let f = fixture();
    f.routes.set(
        "org_ms",
        Route::Provider {
            provider: ProviderKind::Microsoft,
            sender: mailbox("ops@acme.example", "Acme"),
            fallback: Fallback::None,
            save_to_sent_items: true,
            budget: Default::default(),
        },
    );
    let done = finished(f.handle(&job("org_ms")).await);
    assert_eq!(done.result.status, ResultStatus::Sent);
    assert!(f.senders.sent()[0].message.save_to_sent_items);
}

#[tokio::test]
async fn an_organization_without_integration_is_served_by_the_platform_sender() {
    let f = fixture();
    let done = finished(f.handle(&job("org_plain")).await);
    assert_eq!(done.result.status, ResultStatus::Sent);
    assert_eq!(done.result.provider, Some(ProviderKind::Default));
    assert!(!done.result.fallback);
    assert_eq!(done.result.sender.unwrap().email.as_str(), PLATFORM);
    assert_eq!(f.senders.sent()[0].message.reply_to, None);
}

#[tokio::test]
async fn a_transient_failure_delays_the_job_and_releases_its_claim() {
    let f = fixture();
    f.routes.set("org_ms", microsoft(Fallback::None));
    f.senders
        .answer(send_error(FailureClass::unavailable(None)));
    let j = job("org_ms");

    let decision = f.handle(&j).await;
    let Decision::Delay { ref history, .. } = decision else {
        panic!("expected a delay, got {decision:?}");
    };
    assert!(history.starts_with("#1 "), "{history}");
    let (wait, attempts, reason) = delayed(decision);
    assert_eq!(reason, DelayReason::ProviderUnavailable);
    assert_eq!(attempts, 1);
    // Full jitter on the first retry: at most the backoff's base.
    assert!(wait <= config().retry.backoff.base, "{wait:?}");
    assert_eq!(f.ledger.get(&key(&j)), Some(Entry::Released));
    assert!(f.routes.pauses.lock().unwrap().is_empty(), "not a throttle");
}

#[tokio::test]
async fn a_transient_failure_with_no_attempt_left_fails_with_a_dead_letter() {
    let f = fixture();
    f.routes.set("org_ms", microsoft(Fallback::None));
    f.senders
        .answer(send_error(FailureClass::unavailable(None)));
    let j = job("org_ms");
    let mut delivery = incoming(&j);
    delivery.attempts = config().retry.max_attempts - 1;

    let done = finished(f.dispatcher.handle(&delivery).await);
    assert_eq!(done.result.status, ResultStatus::Failed);
    assert_eq!(done.result.attempts, config().retry.max_attempts);
    assert_eq!(
        done.result.error.unwrap().code,
        ErrorCode::ProviderUnavailable
    );
    let dead = done
        .dead_letter
        .expect("retries exhausted are dead-lettered");
    assert_eq!(dead.reason, ErrorCode::ProviderUnavailable);
    assert!(dead.detail.contains("retries exhausted"), "{}", dead.detail);
    assert_eq!(recorded_status(&f.ledger, &key(&j)), "failed");
}

#[tokio::test]
async fn a_permanent_failure_fails_at_once_without_a_dead_letter() {
    let f = fixture();
    f.routes.set("org_ms", microsoft(Fallback::None));
    f.senders.answer(send_error(FailureClass::Permanent(
        ErrorCode::RecipientRejected,
    )));
    let j = job("org_ms");

    let done = finished(f.handle(&j).await);
    assert_eq!(done.result.status, ResultStatus::Failed);
    assert_eq!(
        done.result.error.unwrap().code,
        ErrorCode::RecipientRejected
    );
    assert!(done.dead_letter.is_none());
    assert_eq!(recorded_status(&f.ledger, &key(&j)), "failed");
    assert_eq!(f.sent(), 1);
}

#[tokio::test]
async fn a_refused_grant_without_fallback_fails_auth_revoked_and_tells_the_host_once() {
    let f = fixture();
    f.routes.set("org_ms", microsoft(Fallback::None));
    let revoked = |newly| {
        Err(SendFailure::Revoked {
            reason: "AADSTS700082: the refresh token has expired".into(),
            code: Some("invalid_grant".into()),
            newly,
        })
    };
    f.senders.answer(revoked(true));
    f.senders.answer(revoked(false));

    let done = finished(f.handle(&job("org_ms")).await);
    assert_eq!(done.result.status, ResultStatus::Failed);
    assert_eq!(done.result.provider, Some(ProviderKind::Microsoft));
    let error = done.result.error.unwrap();
    assert_eq!(error.code, ErrorCode::AuthRevoked);
    assert_eq!(error.provider_code.as_deref(), Some("invalid_grant"));
    assert!(done.dead_letter.is_none());
    assert_eq!(done.events.len(), 1, "integration.needs_reauth");
    assert_eq!(done.events[0].organization_id, "org_ms");
    assert_eq!(done.events[0].provider, ProviderKind::Microsoft);

    // The next job of the organization found the grant already marked: no event.
    let next = finished(f.handle(&job("org_ms")).await);
    assert_eq!(next.result.error.unwrap().code, ErrorCode::AuthRevoked);
    assert!(next.events.is_empty());
    assert_eq!(f.sent(), 2, "no stand-in without fallback");
}

#[tokio::test]
async fn a_refused_grant_with_fallback_goes_out_through_the_platform_sender() {
    let f = fixture();
    f.routes.set("org_ms", microsoft(Fallback::PlatformSender));
    f.senders.answer(Err(SendFailure::Revoked {
        reason: "invalid_grant".into(),
        code: None,
        newly: true,
    }));

    let done = finished(f.handle(&job("org_ms")).await);
    assert_eq!(done.result.status, ResultStatus::Sent, "{:?}", done.result);
    assert_eq!(done.result.provider, Some(ProviderKind::Default));
    assert!(done.result.fallback);
    assert_eq!(
        done.result.attempts, 2,
        "the refused attempt and the stand-in"
    );
    let from = done.result.sender.unwrap();
    assert_eq!(from.email.as_str(), PLATFORM);
    assert_eq!(
        from.name.as_deref(),
        Some("Acme"),
        "the organization's name"
    );
    assert_eq!(
        done.events.len(),
        1,
        "the host application still hears of it"
    );

    let sent = f.senders.sent();
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[1].provider, ProviderKind::Default);
    assert_eq!(
        sent[1].message.reply_to.as_ref().unwrap().email.as_str(),
        "ops@acme.example",
        "replies go to the organization"
    );
}

#[tokio::test]
async fn a_route_already_on_fallback_sends_on_behalf_of_the_organization() {
    let f = fixture();
    f.routes.set(
        "org_fb",
        Route::Platform {
            on_behalf_of: Some(mailbox("ops@acme.example", "Acme")),
        },
    );
    let done = finished(f.handle(&job("org_fb")).await);
    assert_eq!(done.result.status, ResultStatus::Sent);
    assert_eq!(done.result.provider, Some(ProviderKind::Default));
    assert!(done.result.fallback);
    assert!(done.events.is_empty(), "the event went out when it broke");
    assert_eq!(
        f.senders.sent()[0]
            .message
            .reply_to
            .as_ref()
            .unwrap()
            .email
            .as_str(),
        "ops@acme.example"
    );
}

#[tokio::test]
async fn a_revoked_route_without_fallback_fails_without_sending() {
    let f = fixture();
    f.routes.set(
        "org_dead",
        Route::Revoked {
            provider: ProviderKind::Google,
        },
    );
    let done = finished(f.handle(&job("org_dead")).await);
    assert_eq!(done.result.error.unwrap().code, ErrorCode::AuthRevoked);
    assert_eq!(done.result.provider, Some(ProviderKind::Google));
    assert_eq!(f.sent(), 0);
}

#[tokio::test]
async fn refused_scopes_mark_the_integration_needs_reauth() {
    let f = fixture();
    f.routes.set(
        "org_g",
        Route::Provider {
            provider: ProviderKind::Google,
            sender: mailbox("ops@globex.example", "Globex"),
            fallback: Fallback::None,
            save_to_sent_items: false,
            budget: Default::default(),
        },
    );
    let mut refused = SendError::permanent(ErrorCode::AuthRevoked, "Insufficient Permission");
    refused.provider_code = Some("insufficientPermissions".into());
    f.senders.answer(Err(SendFailure::Send(refused)));

    let done = finished(f.handle(&job("org_g")).await);
    assert_eq!(done.result.error.unwrap().code, ErrorCode::AuthRevoked);
    assert_eq!(
        *f.routes.needs_reauth.lock().unwrap(),
        vec![("org_g".to_owned(), "insufficientPermissions".to_owned())]
    );
    assert_eq!(done.events.len(), 1);
    assert_eq!(done.events[0].reason, "insufficientPermissions");
}

#[tokio::test]
async fn a_throttled_send_pauses_the_mailbox_and_defers_its_next_jobs() {
    let f = fixture();
    f.routes.set("org_ms", microsoft(Fallback::None));
    f.senders.answer(send_error(FailureClass::throttled(Some(
        Duration::from_secs(30),
    ))));
    let j = job("org_ms");
    let before = Utc::now();

    let (wait, attempts, reason) = delayed(f.handle(&j).await);
    assert_eq!(reason, DelayReason::Throttled);
    assert_eq!(attempts, 1);
    assert!(
        wait >= Duration::from_secs(30),
        "Retry-After is honoured: {wait:?}"
    );
    assert_eq!(f.ledger.get(&key(&j)), Some(Entry::Released));

    // Shared with the other replicas, until the wait is over.
    let pauses = f.routes.pauses.lock().unwrap().clone();
    assert_eq!(pauses.len(), 1);
    let (org, until, why) = &pauses[0];
    assert_eq!((org.as_str(), why.as_str()), ("org_ms", "throttled"));
    assert!(*until >= before + chrono::Duration::seconds(30), "{until}");

    // And here: the next job of that mailbox does not reach the provider.
    let next = job("org_ms");
    let (wait, _, reason) = delayed(f.handle(&next).await);
    assert_eq!(reason, DelayReason::Paced(DeferReason::MailboxPaused));
    assert!(wait > Duration::from_secs(25), "{wait:?}");
    assert_eq!(f.ledger.get(&key(&next)), None, "deferred before its claim");
    assert_eq!(f.sent(), 1);
}

/// Takes every one of `org`'s fleet-wide slots, as other replicas' sends would.
async fn hold_every_slot(slots: &FakeSlots, org: &str) -> Vec<mail_dispatch_store::SlotLease> {
    let mut held = Vec::new();
    while let Some(lease) = slots
        .acquire_mailbox_slot(org, 4, Duration::from_secs(30))
        .await
        .unwrap()
    {
        held.push(lease);
    }
    assert_eq!(held.len(), 4);
    held
}

/// Issue #13 point 3: with every slot of the mailbox held by other replicas, a
/// job waits for the release they announce instead of going to a delay queue
/// (from which it came back a second later at best, which kept a mailbox shared
/// by three replicas at half its rate).
#[tokio::test]
async fn a_job_finding_its_mailbox_full_goes_as_soon_as_another_replica_frees_a_slot() {
    let f = Arc::new(fixture());
    f.routes.set("org_ms", microsoft(Fallback::None));
    let held = hold_every_slot(&f.slots, "org_ms").await;
    let j = job("org_ms");
    let started = std::time::Instant::now();
    let handling = tokio::spawn({
        let (f, j) = (Arc::clone(&f), j.clone());
        async move { f.handle(&j).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(f.sent(), 0, "no slot, no send");
    // Another replica's send is over: its release is announced (NOTIFY).
    f.slots.release_mailbox_slot(&held[0]).await.unwrap();
    f.dispatcher.pacer.fleet_slot_freed("org_ms");

    let decision = handling.await.unwrap();
    assert_eq!(finished(decision).result.status, ResultStatus::Sent);
    assert!(
        started.elapsed() < Duration::from_millis(400),
        "sent at the release, not after a poll or a deferral: {:?}",
        started.elapsed()
    );
}

/// A slot freed without a notification (a crashed replica's lease expired, or
/// the listener was reconnecting) is found by the waiting job's own poll.
#[tokio::test]
async fn a_slot_freed_without_notice_is_found_by_the_waiting_job() {
    let f = Arc::new(fixture());
    f.routes.set("org_ms", microsoft(Fallback::None));
    let held = hold_every_slot(&f.slots, "org_ms").await;
    let j = job("org_ms");
    let handling = tokio::spawn({
        let (f, j) = (Arc::clone(&f), j.clone());
        async move { f.handle(&j).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    f.slots.release_mailbox_slot(&held[1]).await.unwrap();
    let decision = handling.await.unwrap();
    assert_eq!(finished(decision).result.status, ResultStatus::Sent);
}

/// A mailbox that stays full: after the wait the job is deferred (before its
/// claim, not an attempt), so it holds no consumer slot meanwhile.
#[tokio::test]
async fn a_job_whose_mailbox_stays_full_is_deferred_after_the_wait() {
    let f = fixture();
    f.routes.set("org_ms", microsoft(Fallback::None));
    let _held = hold_every_slot(&f.slots, "org_ms").await;
    let j = job("org_ms");
    let started = std::time::Instant::now();

    let (wait, attempts, reason) = delayed(f.handle(&j).await);
    assert_eq!(reason, DelayReason::Paced(DeferReason::MailboxBusy));
    assert_eq!(attempts, 0);
    assert!(wait > Duration::ZERO);
    assert!(
        started.elapsed() >= FLEET_SLOT_WAIT,
        "{:?}",
        started.elapsed()
    );
    assert_eq!(f.ledger.get(&key(&j)), None, "deferred before its claim");
    assert_eq!(f.sent(), 0);
}

#[tokio::test]
async fn a_job_of_an_organization_without_room_is_deferred_before_its_claim() {
    let mut config = config();
    config.pacing.org_max_in_flight = 1;
    let f = fixture_with(config);
    // Another job of the organization is being sent.
    let Admission::Go(held) =
        f.dispatcher
            .pacer
            .admit("org_busy", ProviderKind::Default, 1, Utc::now())
    else {
        panic!("the first job has room");
    };
    let j = job("org_busy");

    let (wait, attempts, reason) = delayed(f.handle(&j).await);
    assert_eq!(reason, DelayReason::Paced(DeferReason::OrganizationBusy));
    assert_eq!(attempts, 0, "a deferral is not an attempt");
    assert!(wait > Duration::ZERO);
    assert_eq!(f.ledger.get(&key(&j)), None);
    assert_eq!(f.sent(), 0);

    // Once that send is over, the job goes.
    drop(held);
    assert_eq!(
        finished(f.handle(&j).await).result.status,
        ResultStatus::Sent
    );
}

#[tokio::test]
async fn a_completed_job_is_published_again_without_sending() {
    let f = fixture();
    f.routes.set("org_ms", microsoft(Fallback::None));
    let j = job("org_ms");
    let first = finished(f.handle(&j).await);

    // While the first publisher's lease runs, the job id is held.
    let (wait, _, reason) = delayed(f.handle(&j).await);
    assert_eq!(reason, DelayReason::ClaimedElsewhere);
    assert_eq!(wait, BACKOFF_WHEN_BLOCKED);

    // Its publish failed (or its lease ran out): the stored result goes out again.
    f.ledger.release_publish(&key(&j)).await.unwrap();
    let again = finished(f.handle(&j).await);
    // As published: the stored copy keeps completed_at to the millisecond.
    let json = |r| serde_json::to_value(r).unwrap();
    assert_eq!(json(&again.result), json(&first.result));
    assert_eq!(again.ledger_key, Some(key(&j)));
    assert_eq!(f.sent(), 1, "sent once");
}

#[tokio::test]
async fn a_job_whose_result_was_published_is_a_duplicate() {
    let f = fixture();
    let j = job("org_1");
    finished(f.handle(&j).await);
    f.ledger.mark_published(&[key(&j)]).await.unwrap();
    assert!(matches!(f.handle(&j).await, Decision::Duplicate));
    assert_eq!(f.sent(), 1);
}

#[tokio::test]
async fn a_job_held_by_another_workers_live_claim_waits_for_it() {
    let f = fixture();
    let j = job("org_1");
    f.ledger.set(
        key(&j),
        Entry::Claimed {
            claims: 1,
            live: true,
            owner: ANOTHER_WORKER,
        },
    );
    let (wait, _, reason) = delayed(f.handle(&j).await);
    assert_eq!(reason, DelayReason::ClaimedElsewhere);
    assert_eq!(wait, BACKOFF_WHEN_BLOCKED);
    assert_eq!(f.sent(), 0);

    // Past its budget, it is looked at again once the holder's lease is over.
    let mut old = incoming(&j);
    old.first_seen = Utc::now() - chrono::Duration::from_std(config().retry.max_age).unwrap();
    let (wait, _, reason) = delayed(f.dispatcher.handle(&old).await);
    assert_eq!(reason, DelayReason::ClaimedElsewhere);
    assert_eq!(wait, config().claim_lease);
}

#[tokio::test]
async fn a_job_that_keeps_killing_its_workers_is_given_up_without_sending() {
    let f = fixture();
    let j = job("org_1");
    // Five workers claimed it and died; the sixth takes the expired claim over.
    f.ledger.set(
        key(&j),
        Entry::Claimed {
            claims: super::MAX_CLAIMS_WITHOUT_OUTCOME,
            live: false,
            owner: ANOTHER_WORKER,
        },
    );
    let done = finished(f.handle(&j).await);
    assert_eq!(
        done.result.error.unwrap().code,
        ErrorCode::ProviderUnavailable
    );
    assert_eq!(
        done.dead_letter.unwrap().reason,
        ErrorCode::ProviderUnavailable
    );
    assert_eq!(f.sent(), 0);
}

#[tokio::test]
async fn a_job_redelivered_too_often_is_given_up_before_the_brokers_limit() {
    let f = fixture();
    let j = job("org_1");
    let mut delivery = incoming(&j);
    delivery.delivery_count = config().topology.delivery_limit - super::DELIVERY_LIMIT_MARGIN;
    let done = finished(f.dispatcher.handle(&delivery).await);
    assert_eq!(
        done.dead_letter.unwrap().reason,
        ErrorCode::ProviderUnavailable
    );
    assert_eq!(f.sent(), 0);
}

#[tokio::test]
async fn a_database_outage_delays_the_job_without_sending_or_spending_an_attempt() {
    let f = fixture();
    let j = job("org_1");
    f.routes.down.store(true, Ordering::SeqCst);
    let (wait, attempts, reason) = delayed(f.handle(&j).await);
    assert_eq!(
        (wait, attempts, reason),
        (BACKOFF_WHEN_BLOCKED, 0, DelayReason::DatabaseUnavailable)
    );

    // The route is known, the ledger is not reachable.
    f.routes.down.store(false, Ordering::SeqCst);
    f.ledger.down.store(true, Ordering::SeqCst);
    let (_, _, reason) = delayed(f.handle(&j).await);
    assert_eq!(reason, DelayReason::DatabaseUnavailable);
    assert_eq!(f.sent(), 0);
}

#[tokio::test]
async fn a_job_past_its_not_after_expires_without_sending() {
    let f = fixture();
    let mut j = job("org_1");
    j["not_after"] = json!((Utc::now() - chrono::Duration::seconds(1)).to_rfc3339());
    let done = finished(f.handle(&j).await);
    assert_eq!(done.result.error.unwrap().code, ErrorCode::Expired);
    assert!(done.dead_letter.is_none());
    assert_eq!(f.sent(), 0);
}

#[tokio::test]
async fn a_delayed_copy_back_before_its_time_waits_the_rest() {
    let f = fixture();
    let mut delivery = incoming(&job("org_1"));
    delivery.attempts = 2;
    delivery.not_before = Some(Utc::now() + chrono::Duration::seconds(40));
    let (wait, attempts, reason) = delayed(f.dispatcher.handle(&delivery).await);
    assert_eq!(reason, DelayReason::RemainingWait);
    assert_eq!(attempts, 2);
    assert!(
        wait > Duration::from_secs(39) && wait <= Duration::from_secs(40),
        "{wait:?}"
    );
    assert_eq!(f.sent(), 0);
}

#[tokio::test]
async fn a_job_whose_earlier_send_may_have_been_accepted_is_failed_not_sent_again() {
    let f = fixture();
    let j = job("org_1");
    // Its last worker was stopped while the send was at the provider.
    f.ledger.set(key(&j), Entry::Ambiguous { owner: None });
    let done = finished(f.handle(&j).await);
    assert_eq!(done.result.status, ResultStatus::Failed);
    assert_eq!(
        done.result.error.unwrap().code,
        ErrorCode::ProviderUnavailable
    );
    let dead = done.dead_letter.expect("an operator may replay it");
    assert!(dead.detail.contains("may have accepted"), "{}", dead.detail);
    assert_eq!(recorded_status(&f.ledger, &key(&j)), "failed");
    assert_eq!(f.sent(), 0);
}

#[tokio::test]
async fn a_claim_taken_over_during_the_send_leaves_the_outcome_to_its_new_holder() {
    let f = fixture();
    let j = job("org_1");
    let (ledger, k) = (f.ledger.clone(), key(&j));
    let taken_over = Entry::Claimed {
        claims: 2,
        live: true,
        owner: ANOTHER_WORKER,
    };
    let entry = taken_over.clone();
    *f.senders.during_send.lock().unwrap() = Some(Box::new(move || ledger.set(k, entry)));

    assert!(matches!(f.handle(&j).await, Decision::ClaimLost));
    assert_eq!(
        f.ledger.get(&key(&j)),
        Some(taken_over),
        "the new holder's claim is left alone"
    );
}

#[tokio::test]
async fn a_send_dropped_at_the_provider_is_known_to_the_runner() {
    let f = fixture();
    let j = job("org_1");
    let delivery = incoming(&j);
    // What the runner finds if it drops the work during the send.
    let watch = delivery.in_flight.clone();
    let seen = Arc::new(std::sync::Mutex::new(None));
    let record = seen.clone();
    *f.senders.during_send.lock().unwrap() = Some(Box::new(move || {
        *record.lock().unwrap() = Some(watch.take());
    }));
    finished(f.dispatcher.handle(&delivery).await);
    let Some(crate::in_flight::Dropped::AtProvider(dropped, _, provider)) =
        seen.lock().unwrap().take()
    else {
        panic!("the claim and the send at the provider are known");
    };
    assert_eq!((dropped, provider), (key(&j), ProviderKind::Default));
}
