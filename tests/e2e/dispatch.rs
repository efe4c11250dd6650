//! `Dispatcher::handle` driven directly, without a broker: one delivery in, one
//! decision out, against a test database and the provider stand-ins. The worker
//! crate's unit tests (`crates/worker/src/dispatch/tests.rs`) drive the same
//! decisions over in-memory fakes; the broker side of each decision (publish,
//! delay, ack) is covered by the other modules.

use std::time::Duration;

use mail_dispatch_domain::{ErrorCode, ResultStatus};
use mail_dispatch_store::{Fallback, JobKey};
use mail_dispatch_test_support::standins::{self, Vendor};
use mail_dispatch_test_support::{Harness, TestAppOptions};
use mail_dispatch_worker::pacing::DeferReason;
use mail_dispatch_worker::{Decision, DelayReason, Finish, Incoming};
use serde_json::{Value, json};

fn job(org: &str) -> Value {
    json!({
        "id": uuid::Uuid::new_v4().to_string(),
        "organization_id": org,
        "to": [{"email": "alice@example.com"}],
        "subject": "Nouvelle tâche",
        "text": "Bonjour",
    })
}

fn finished(decision: Decision) -> Finish {
    match decision {
        Decision::Finish(f) => *f,
        other => panic!("expected a final outcome, got {other:?}"),
    }
}

fn options() -> TestAppOptions {
    TestAppOptions {
        in_process_attempts: 1,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invalid_job_is_finished_as_invalid_and_dead_lettered() {
    let h = Harness::new(options()).await;
    let mut bad = job("org_1");
    bad["to"] = json!([]);
    let f = finished(h.handle(&bad).await);
    assert_eq!(f.result.status, ResultStatus::Failed);
    assert_eq!(f.result.error.unwrap().code, ErrorCode::InvalidJob);
    assert_eq!(f.dead_letter.unwrap().reason, ErrorCode::InvalidJob);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_accepted_send_is_finished_as_sent_and_a_redelivery_is_a_duplicate() {
    let h = Harness::new(options()).await;
    h.connect("org_ms", Vendor::Microsoft, "a@customer.com")
        .await;
    let j = job("org_ms");
    let f = finished(h.handle(&j).await);
    assert_eq!(f.result.status, ResultStatus::Sent, "{:?}", f.result);
    assert!(f.result.provider_message_id.is_some(), "Graph's request-id");
    assert!(f.dead_letter.is_none());
    assert_eq!(h.standins.graph_messages().len(), 1);

    // Its result confirmed published: the same job id again sends nothing.
    h.db.store
        .mark_published(&[JobKey::new("org_ms", j["id"].as_str().unwrap())])
        .await
        .unwrap();
    assert!(matches!(h.handle(&j).await, Decision::Duplicate));
    assert_eq!(h.standins.graph_messages().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn each_provider_outcome_becomes_its_decision() {
    let h = Harness::new(options()).await;
    h.connect("org_ms", Vendor::Microsoft, "a@customer.com")
        .await;

    // Transient: delayed, the attempt counted, nothing final.
    h.standins
        .script(Vendor::Microsoft, [standins::graph_unavailable()]);
    match h.handle(&job("org_ms")).await {
        Decision::Delay {
            reason, attempts, ..
        } => {
            assert_eq!(reason, DelayReason::ProviderUnavailable);
            assert_eq!(attempts, 1);
        }
        other => panic!("{other:?}"),
    }

    // Throttled: delayed as throttled, and the mailbox paused for every replica.
    h.standins
        .script(Vendor::Microsoft, [standins::graph_throttled(30)]);
    match h.handle(&job("org_ms")).await {
        Decision::Delay { reason, wait, .. } => {
            assert_eq!(reason, DelayReason::Throttled);
            assert!(
                wait >= Duration::from_secs(29),
                "Retry-After honoured: {wait:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    // The next job of that mailbox is deferred by the pause, before any send.
    let before = h.standins.send_attempts(Vendor::Microsoft);
    match h.handle(&job("org_ms")).await {
        Decision::Delay { reason, .. } => {
            assert_eq!(reason, DelayReason::Paced(DeferReason::MailboxPaused));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(h.standins.send_attempts(Vendor::Microsoft), before);

    // Permanent: failed at once, not dead-lettered.
    let h = Harness::new(options()).await;
    h.connect("org_ms", Vendor::Microsoft, "a@customer.com")
        .await;
    h.standins
        .script(Vendor::Microsoft, [standins::graph_invalid_recipients()]);
    let f = finished(h.handle(&job("org_ms")).await);
    assert_eq!(f.result.error.unwrap().code, ErrorCode::RecipientRejected);
    assert!(f.dead_letter.is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_past_not_after_expires_without_a_send() {
    let h = Harness::new(options()).await;
    h.connect("org_g", Vendor::Google, "g@customer.com").await;
    let mut j = job("org_g");
    j["not_after"] = json!("2020-01-01T00:00:00Z");
    let f = finished(h.handle(&j).await);
    assert_eq!(f.result.error.unwrap().code, ErrorCode::Expired);
    assert_eq!(h.standins.send_attempts(Vendor::Google), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_grant_with_the_fallback_goes_out_through_the_platform_sender_with_the_event() {
    let h = Harness::new(options()).await;
    h.connect("org_ms", Vendor::Microsoft, "a@customer.com")
        .await;
    h.db.store
        .save_sender(
            "org_ms",
            "a@customer.com",
            Some("Customer"),
            Fallback::PlatformSender,
        )
        .await
        .unwrap();
    // The access token expired and the grant was revoked.
    h.standins.invalidate_all_access(Vendor::Microsoft);
    h.standins.revoke_account("a@customer.com");
    h.services.senders.tokens.forget("org_ms");
    let f = finished(h.handle(&job("org_ms")).await);
    assert_eq!(f.result.status, ResultStatus::Sent, "{:?}", f.result);
    assert!(f.result.fallback);
    assert_eq!(f.events.len(), 1, "integration.needs_reauth goes with it");
    assert_eq!(f.events[0].organization_id, "org_ms");
}

fn older_than_the_budget(j: &Value, options: &TestAppOptions) -> Incoming {
    let mut incoming = Incoming::new(serde_json::to_vec(j).unwrap());
    incoming.first_seen = chrono::Utc::now()
        - chrono::Duration::from_std(options.max_age).unwrap()
        - chrono::Duration::minutes(1);
    incoming
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crashed_workers_claim_taken_over_past_the_jobs_budget_fails_without_a_send() {
    let h = Harness::new(options()).await;
    h.connect("org_ms", Vendor::Microsoft, "a@customer.com")
        .await;
    let j = job("org_ms");
    // One worker claimed it and died; its lease is over.
    h.db.store
        .claim_job(
            &JobKey::new("org_ms", j["id"].as_str().unwrap()),
            Duration::ZERO,
        )
        .await
        .unwrap();
    let f = finished(
        h.handle_incoming(&older_than_the_budget(&j, &options()))
            .await,
    );
    let error = f.result.error.unwrap();
    assert_eq!(error.code, ErrorCode::ProviderUnavailable, "{error:?}");
    assert_eq!(
        f.dead_letter.unwrap().reason,
        ErrorCode::ProviderUnavailable
    );
    assert_eq!(h.standins.send_attempts(Vendor::Microsoft), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_held_by_a_live_claim_past_its_budget_waits_out_the_lease() {
    let h = Harness::new(options()).await;
    let j = job("org_1");
    h.db.store
        .claim_job(
            &JobKey::new("org_1", j["id"].as_str().unwrap()),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    // Within its budget: looked at again shortly.
    match h.handle(&j).await {
        Decision::Delay { reason, wait, .. } => {
            assert_eq!(reason, DelayReason::ClaimedElsewhere);
            assert_eq!(wait, Duration::from_secs(5));
        }
        other => panic!("{other:?}"),
    }
    // Past it: the next look is when the holder's lease is over, where either its
    // outcome is there or the take-over fails the job (above).
    match h
        .handle_incoming(&older_than_the_budget(&j, &options()))
        .await
    {
        Decision::Delay { reason, wait, .. } => {
            assert_eq!(reason, DelayReason::ClaimedElsewhere);
            assert_eq!(wait, options().claim_lease);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_blocked_by_the_database_past_its_budget_fails_with_a_dead_letter() {
    let h = Harness::new(options()).await;
    let j = job("org_1");
    h.db.client()
        .await
        .batch_execute("ALTER TABLE job_ledger RENAME TO job_ledger_away")
        .await
        .unwrap();
    match h.handle(&j).await {
        Decision::Delay { reason, .. } => assert_eq!(reason, DelayReason::DatabaseUnavailable),
        other => panic!("{other:?}"),
    }
    let f = finished(
        h.handle_incoming(&older_than_the_budget(&j, &options()))
            .await,
    );
    let error = f.result.error.unwrap();
    assert_eq!(error.code, ErrorCode::ProviderUnavailable, "{error:?}");
    assert!(error.message.contains("database"), "{}", error.message);
    assert_eq!(
        f.dead_letter.unwrap().reason,
        ErrorCode::ProviderUnavailable
    );
    let sent = std::fs::read_dir(&h.outbox).map(|d| d.count()).unwrap_or(0);
    assert_eq!(sent, 0);
}
