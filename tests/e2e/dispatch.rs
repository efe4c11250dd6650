//! `Dispatcher::handle` driven directly, without a broker: one delivery in, one
//! decision out, against a test database and the provider stand-ins. The broker
//! side of each decision (publish, delay, ack) is covered by the other modules.

use std::time::Duration;

use mail_dispatch_domain::{ErrorCode, ResultStatus};
use mail_dispatch_store::{Fallback, JobKey};
use mail_dispatch_test_support::standins::{self, Vendor};
use mail_dispatch_test_support::{Harness, TestAppOptions};
use mail_dispatch_worker::pacing::DeferReason;
use mail_dispatch_worker::{Decision, DelayReason, Finish};
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
    h.dispatcher.services.senders.tokens.forget("org_ms");
    let f = finished(h.handle(&job("org_ms")).await);
    assert_eq!(f.result.status, ResultStatus::Sent, "{:?}", f.result);
    assert!(f.result.fallback);
    assert_eq!(f.events.len(), 1, "integration.needs_reauth goes with it");
    assert_eq!(f.events[0].organization_id, "org_ms");
}
