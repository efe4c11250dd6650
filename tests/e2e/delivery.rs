//! Delivery guarantees: retries that honour the providers, delay queues that hold
//! no consumer slot, dead letters, idempotency, expiry.

use std::time::{Duration, Instant};

use lapin::options::{BasicGetOptions, BasicNackOptions};
use lapin::types::{AMQPValue, FieldTable};
use mail_dispatch_broker::{header_str, json_properties};
use mail_dispatch_store::JobKey;
use mail_dispatch_test_support::standins::{self, Vendor};
use mail_dispatch_test_support::{TestApp, TestAppOptions};
use serde_json::json;

use crate::support::{WAIT, assert_valid_result};

fn gap(times: &[Instant]) -> Duration {
    times[1].duration_since(times[0])
}

#[tokio::test(flavor = "multi_thread")]
async fn a_graph_429_with_retry_after_seconds_is_waited_out_then_sent() {
    let app = TestApp::spawn().await;
    app.connect_mailbox("org_ms", Vendor::Microsoft, "a@customer.com", "A")
        .await;
    app.standins
        .script(Vendor::Microsoft, [standins::graph_throttled(1)]);
    let mut results = app.amqp.tap_results().await;
    let job = app.job("org_ms");
    app.amqp.publish_job(&job).await;
    let r = results.result(job["id"].as_str().unwrap(), WAIT).await;
    assert_valid_result(&r);
    assert_eq!(r["status"], "sent", "{r:#}");
    assert_eq!(
        r["attempts"], 1,
        "a 429 is not an attempt: the provider declined the request"
    );
    let times = app.standins.attempt_times(Vendor::Microsoft);
    assert!(
        gap(&times) >= Duration::from_secs(1),
        "Retry-After: 1 respected, gap {:?}",
        gap(&times)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_long_graph_retry_after_goes_through_a_delay_queue() {
    let app = TestApp::spawn().await;
    app.connect_mailbox("org_ms", Vendor::Microsoft, "a@customer.com", "A")
        .await;
    app.standins
        .script(Vendor::Microsoft, [standins::graph_throttled(3)]);
    let mut results = app.amqp.tap_results().await;
    let job = app.job("org_ms");
    app.amqp.publish_job(&job).await;
    let r = results.result(job["id"].as_str().unwrap(), WAIT).await;
    assert_eq!(r["status"], "sent", "{r:#}");
    assert_eq!(
        r["attempts"], 1,
        "a 429 is not an attempt: the provider declined the request"
    );
    let times = app.standins.attempt_times(Vendor::Microsoft);
    assert!(
        gap(&times) >= Duration::from_secs(3),
        "gap {:?}",
        gap(&times)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gmail_429_is_retried_after_the_time_in_its_message() {
    let app = TestApp::spawn().await;
    app.connect_mailbox("org_g", Vendor::Google, "g@customer.com", "G")
        .await;
    app.standins.script(
        Vendor::Google,
        [standins::gmail_rate_limited(Duration::from_secs(3))],
    );
    let mut results = app.amqp.tap_results().await;
    let job = app.job("org_g");
    app.amqp.publish_job(&job).await;
    let r = results.result(job["id"].as_str().unwrap(), WAIT).await;
    assert_eq!(r["status"], "sent", "{r:#}");
    assert_eq!(
        r["attempts"], 1,
        "a 429 is not an attempt: the provider declined the request"
    );
    let times = app.standins.attempt_times(Vendor::Google);
    assert!(
        gap(&times) >= Duration::from_millis(2900),
        "gap {:?}",
        gap(&times)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_permanent_error_is_attempted_exactly_once() {
    let app = TestApp::spawn().await;
    app.connect(
        "org_ms",
        Vendor::Microsoft,
        "a@customer.com",
        "other@customer.com",
        "Other",
    )
    .await;
    app.standins
        .script(Vendor::Microsoft, [standins::graph_send_as_denied()]);
    let mut results = app.amqp.tap_results().await;
    let job = app.job("org_ms");
    app.amqp.publish_job(&job).await;
    let r = results.result(job["id"].as_str().unwrap(), WAIT).await;
    assert_valid_result(&r);
    assert_eq!(r["status"], "failed");
    assert_eq!(r["error"]["code"], "sender_not_allowed");
    assert_eq!(r["error"]["provider_status"], 403);
    assert_eq!(r["error"]["provider_code"], "ErrorSendAsDenied");
    assert_eq!(r["attempts"], 1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(app.standins.send_attempts(Vendor::Microsoft), 1);
    assert_eq!(
        app.amqp.queue_len(&app.amqp.topology.dead_queue).await,
        0,
        "a refusal is a result, not a dead letter"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_persistent_503_ends_as_provider_unavailable_in_the_dead_letter_queue() {
    let app = TestApp::spawn_with(TestAppOptions {
        max_attempts: 3,
        ..Default::default()
    })
    .await;
    app.connect_mailbox("org_g", Vendor::Google, "g@customer.com", "G")
        .await;
    app.standins.script(
        Vendor::Google,
        (0..10).map(|_| standins::gmail_unavailable()),
    );
    let mut results = app.amqp.tap_results().await;
    let job = app.job("org_g");
    app.amqp.publish_job(&job).await;
    let r = results
        .result(job["id"].as_str().unwrap(), Duration::from_secs(30))
        .await;
    assert_valid_result(&r);
    assert_eq!(r["error"]["code"], "provider_unavailable", "{r:#}");
    assert_eq!(r["attempts"], 3);
    assert_eq!(
        app.standins.send_attempts(Vendor::Google),
        3,
        "the attempt budget is respected"
    );
    let dead = app.amqp.drain(&app.amqp.topology.dead_queue).await;
    assert_eq!(dead.len(), 1);
    let p = &dead[0].properties;
    assert_eq!(
        header_str(p, "x-mail-dispatch-reason").as_deref(),
        Some("provider_unavailable")
    );
    assert_eq!(
        header_str(p, "x-mail-dispatch-attempts").as_deref(),
        Some("3")
    );
    assert_eq!(
        header_str(p, "x-mail-dispatch-job-id").as_deref(),
        job["id"].as_str()
    );
    let detail = header_str(p, "x-mail-dispatch-detail").unwrap();
    assert!(
        detail.contains("#1") && detail.contains("#3") && detail.contains("503"),
        "history: {detail}"
    );
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&dead[0].data).unwrap(),
        job,
        "the job itself is kept"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn jobs_waiting_in_delay_queues_do_not_slow_fresh_jobs() {
    let app = TestApp::spawn_with(TestAppOptions {
        concurrency: 8,
        ..Default::default()
    })
    .await;
    app.connect_mailbox("org_busy", Vendor::Microsoft, "a@customer.com", "A")
        .await;
    // Every send of the busy organization is throttled for a minute.
    app.standins.script(
        Vendor::Microsoft,
        (0..100).map(|_| standins::graph_throttled(60)),
    );
    let mut results = app.amqp.tap_results().await;
    for _ in 0..100 {
        app.amqp.publish_job(&app.job("org_busy")).await;
    }
    // Wait until the 100 jobs sit in delay queues.
    let delayed = || async {
        let mut n = 0;
        for tier in &app.amqp.topology.delay_tiers {
            n += app
                .amqp
                .queue_len(&app.amqp.topology.delay_queue(*tier))
                .await;
        }
        n
    };
    let deadline = Instant::now() + WAIT;
    while delayed().await < 100 {
        assert!(
            Instant::now() < deadline,
            "the throttled jobs did not all reach the delay queues"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The first 429 paused the mailbox: the others were deferred without asking Graph.
    let attempts = app.standins.send_attempts(Vendor::Microsoft);
    assert!(
        attempts <= 8,
        "{attempts} attempts: only those already in flight when the pause began"
    );
    let started = Instant::now();
    let fresh: Vec<_> = (0..20).map(|_| app.job("org_quiet")).collect();
    for job in &fresh {
        app.amqp.publish_job(job).await;
    }
    for job in &fresh {
        let r = results
            .result(job["id"].as_str().unwrap(), Duration::from_secs(20))
            .await;
        assert_eq!(r["status"], "sent");
    }
    let took = started.elapsed();
    println!("20 fresh jobs completed in {took:?} while 100 throttled jobs waited in delay queues");
    // Had the waiting jobs kept their 8 consumer slots, nothing could run for 60 s.
    assert!(took < Duration::from_secs(15), "fresh jobs took {took:?}");
    assert_eq!(
        delayed().await,
        100,
        "the throttled jobs still wait in delay queues"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_job_id_published_twice_is_sent_once_with_one_result() {
    let app = TestApp::spawn().await;
    app.connect_mailbox("org_g", Vendor::Google, "g@customer.com", "G")
        .await;
    let mut results = app.amqp.tap_results().await;
    let job = app.job("org_g");
    app.amqp.publish_job(&job).await;
    app.amqp.publish_job(&job).await;
    results.result(job["id"].as_str().unwrap(), WAIT).await;
    // And once more after the first has finished.
    app.amqp.publish_job(&job).await;
    let seen = results.settle(Duration::from_secs(2)).await;
    assert_eq!(
        seen.iter()
            .filter(|s| s.body["job_id"] == job["id"])
            .count(),
        1,
        "one result"
    );
    assert_eq!(app.standins.gmail_messages().len(), 1, "one send");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_past_not_after_fails_as_expired_without_being_sent() {
    let app = TestApp::spawn().await;
    let mut results = app.amqp.tap_results().await;
    let mut job = app.job("org_plain");
    job["not_after"] = json!("2020-01-01T00:00:00Z");
    app.amqp.publish_job(&job).await;
    let r = results.result(job["id"].as_str().unwrap(), WAIT).await;
    assert_valid_result(&r);
    assert_eq!(r["error"]["code"], "expired");
    assert!(app.outbox_files().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_that_comes_back_from_a_delay_queue_after_not_after_fails_as_expired() {
    let app = TestApp::spawn().await;
    let mut results = app.amqp.tap_results().await;
    let mut job = app.job("org_plain");
    job["not_after"] =
        json!((chrono::Utc::now() + chrono::Duration::milliseconds(300)).to_rfc3339());
    // As the worker would have delayed it after a first failed attempt.
    let mut headers = FieldTable::default();
    headers.insert(
        "x-mail-dispatch-attempts".into(),
        AMQPValue::LongString("1".into()),
    );
    let tier = app.amqp.topology.delay_tiers[0];
    app.amqp
        .publish_to_queue(
            &app.amqp.topology.delay_queue(tier),
            &serde_json::to_vec(&job).unwrap(),
            json_properties().with_headers(headers),
        )
        .await;
    let r = results.result(job["id"].as_str().unwrap(), WAIT).await;
    assert_eq!(r["error"]["code"], "expired", "{r:#}");
    assert_eq!(r["attempts"], 1);
    assert!(app.outbox_files().is_empty(), "never sent late");
}

#[tokio::test(flavor = "multi_thread")]
async fn ledger_entries_older_than_the_retention_are_pruned_in_batches() {
    let app = TestApp::spawn().await;
    let client = app.db.client().await;
    client
        .batch_execute(
            "INSERT INTO job_ledger (job_id, organization_id, state, updated_at)
             SELECT 'old-' || i, 'org', 'published', now() - interval '8 days' FROM generate_series(1, 2500) i;
             INSERT INTO job_ledger (job_id, organization_id, state, updated_at)
             SELECT 'recent-' || i, 'org', 'published', now() - interval '1 day' FROM generate_series(1, 10) i;
             INSERT INTO job_ledger (job_id, organization_id, state, updated_at, lease_until)
             VALUES ('old-claimed', 'org', 'claimed', now() - interval '8 days', now() - interval '8 days'),
                    ('old-retrying', 'org', 'retrying', now() - interval '8 days', NULL),
                    ('old-completed', 'org', 'completed', now() - interval '8 days', NULL),
                    ('recent-claimed', 'org', 'claimed', now() - interval '1 hour', now() + interval '1 minute');",
        )
        .await
        .unwrap();
    let deleted = app
        .db
        .store
        .prune_ledger(Duration::from_secs(7 * 24 * 3600), 1000)
        .await
        .unwrap();
    assert_eq!(deleted, 2503, "unfinished entries past the retention too");
    let left: Vec<String> = client
        .query("SELECT job_id FROM job_ledger ORDER BY job_id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(left.len(), 11, "{left:?}");
    assert!(
        left.contains(&"recent-claimed".to_owned()),
        "a live claim is kept"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_job_id_from_two_organizations_is_sent_for_each_with_its_own_result() {
    let app = TestApp::spawn().await;
    let mut results = app.amqp.tap_results().await;
    let mut from_a = app.job("org_a");
    from_a["id"] = json!("task-991");
    let mut from_b = app.job("org_b");
    from_b["id"] = json!("task-991");
    app.amqp.publish_job(&from_a).await;
    let a = results.result("task-991", WAIT).await;
    assert_eq!(a["organization_id"], "org_a", "{a:#}");
    assert_eq!(a["status"], "sent", "{a:#}");
    app.amqp.publish_job(&from_b).await;
    let b = results
        .wait_for(WAIT, |s| {
            s.routing_key.starts_with("result.")
                && s.body["job_id"] == "task-991"
                && s.body["organization_id"] == "org_b"
        })
        .await
        .expect("org_b's job has its own result")
        .body;
    assert_valid_result(&b);
    assert_eq!(b["status"], "sent", "{b:#}");
    // Each organization's id is still idempotent on its own.
    app.amqp.publish_job(&from_a).await;
    app.amqp.publish_job(&from_b).await;
    let seen = results.settle(Duration::from_secs(2)).await;
    let mut orgs: Vec<&str> = seen
        .iter()
        .filter(|s| s.routing_key.starts_with("result.") && s.body["job_id"] == "task-991")
        .map(|s| s.body["organization_id"].as_str().unwrap_or("null"))
        .collect();
    orgs.sort();
    assert_eq!(orgs, ["org_a", "org_b"], "one result per organization");
    assert_eq!(app.outbox_files().len(), 2, "one send per organization");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_claimed_again_and_again_without_an_outcome_is_failed_and_dead_lettered_without_a_send()
 {
    let app = TestApp::spawn().await;
    let mut results = app.amqp.tap_results().await;
    let job = app.job("org_plain");
    let id = job["id"].as_str().unwrap();
    // Five workers took it and died during the send (their leases ran out).
    for _ in 0..5 {
        app.db
            .store
            .claim_job(&JobKey::new("org_plain", id), Duration::ZERO)
            .await
            .unwrap();
    }
    app.amqp.publish_job(&job).await;
    let r = results.result(id, WAIT).await;
    assert_valid_result(&r);
    assert_eq!(r["status"], "failed", "{r:#}");
    assert_eq!(r["error"]["code"], "provider_unavailable", "{r:#}");
    let message = r["error"]["message"].as_str().unwrap();
    assert!(message.contains("claimed 6 times"), "{message}");
    assert!(app.outbox_files().is_empty(), "not sent again");
    let dead = app.amqp.drain(&app.amqp.topology.dead_queue).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(
        header_str(&dead[0].properties, "x-mail-dispatch-reason").as_deref(),
        Some("provider_unavailable")
    );
    assert_eq!(
        header_str(&dead[0].properties, "x-mail-dispatch-job-id").as_deref(),
        Some(id)
    );
    // And it stays finished.
    app.amqp.publish_job(&job).await;
    let seen = results.settle(Duration::from_secs(2)).await;
    assert_eq!(
        seen.iter().filter(|s| s.body["job_id"] == id).count(),
        1,
        "one result"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_redelivered_up_to_near_the_brokers_limit_gets_a_result_and_a_dead_letter() {
    let mut app = TestApp::spawn_with(TestAppOptions {
        in_process_worker: false,
        ..Default::default()
    })
    .await;
    let mut results = app.amqp.tap_results().await;
    let job = app.job("org_plain");
    let id = job["id"].as_str().unwrap();
    app.amqp.publish_job(&job).await;
    // Each delivery "crashes" its consumer: handed back unacknowledged.
    let queue = app.amqp.topology.jobs_queue.clone();
    let channel = app.amqp.broker().await.channel().await.unwrap();
    for n in 0..15 {
        let message = channel
            .basic_get(queue.as_str().into(), BasicGetOptions::default())
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("delivery {n} missing"));
        message
            .delivery
            .nack(BasicNackOptions {
                requeue: true,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    app.worker = Some(app.start_worker().await);
    let r = results.result(id, WAIT).await;
    assert_valid_result(&r);
    assert_eq!(r["status"], "failed", "{r:#}");
    assert_eq!(r["error"]["code"], "provider_unavailable", "{r:#}");
    assert!(app.outbox_files().is_empty(), "not sent");
    let dead = app.amqp.drain(&app.amqp.topology.dead_queue).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(
        header_str(&dead[0].properties, "x-mail-dispatch-reason").as_deref(),
        Some("provider_unavailable"),
        "dead-lettered by the worker, not by the broker"
    );
    let detail = header_str(&dead[0].properties, "x-mail-dispatch-detail").unwrap();
    assert!(detail.contains("delivered 16 times"), "{detail}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_producers_own_copy_of_the_workers_headers_is_ignored() {
    let app = TestApp::spawn().await;
    app.connect_mailbox("org_ms", Vendor::Microsoft, "a@customer.com", "A")
        .await;
    let mut results = app.amqp.tap_results().await;
    // Paused for a moment: every job is deferred once by the pacer first.
    app.dispatcher().pacer.apply_pause(
        "org_ms",
        chrono::Utc::now() + chrono::Duration::milliseconds(1500),
    );
    let far_future = chrono::Utc::now() + chrono::Duration::days(3650);
    let hostile: [(&str, String); 4] = [
        ("x-mail-dispatch-attempts", u32::MAX.to_string()),
        // Within hours of chrono's largest instant.
        ("x-mail-dispatch-first-seen", "8210266876799999".into()),
        (
            "x-mail-dispatch-not-before",
            far_future.timestamp_millis().to_string(),
        ),
        ("x-mail-dispatch-history", "h".repeat(100_000)),
    ];
    let mut jobs = Vec::new();
    for (name, value) in &hostile {
        let job = app.job("org_ms");
        let mut headers = FieldTable::default();
        headers.insert((*name).into(), AMQPValue::LongString(value.clone().into()));
        app.amqp
            .publish_raw(
                &serde_json::to_vec(&job).unwrap(),
                json_properties()
                    .with_message_id(job["id"].as_str().unwrap().into())
                    .with_headers(headers),
            )
            .await;
        jobs.push((name, job));
    }
    for (name, job) in &jobs {
        let r = results.result(job["id"].as_str().unwrap(), WAIT).await;
        assert_valid_result(&r);
        assert_eq!(r["status"], "sent", "{name}: {r:#}");
        assert_eq!(r["attempts"], 1, "{name}: {r:#}");
    }
    assert_eq!(app.standins.graph_messages().len(), hostile.len());
    let seen = results.settle(Duration::from_secs(1)).await;
    assert_eq!(
        seen.iter()
            .filter(|s| s.routing_key.starts_with("result."))
            .count(),
        hostile.len(),
        "one result each"
    );
    for tier in &app.amqp.topology.delay_tiers {
        assert_eq!(
            app.amqp
                .queue_len(&app.amqp.topology.delay_queue(*tier))
                .await,
            0,
            "nothing left cycling through {tier:?}"
        );
    }
}

/// A send that takes longer than the claim's lease keeps its claim (it is
/// extended while the send runs): a copy of the job delivered meanwhile is held
/// back, not sent a second time.
#[tokio::test(flavor = "multi_thread")]
async fn a_send_longer_than_the_claim_lease_is_not_taken_over_by_a_copy() {
    let app = TestApp::spawn_with(TestAppOptions {
        claim_lease: Duration::from_secs(2),
        ..Default::default()
    })
    .await;
    app.connect_mailbox("org_g", Vendor::Google, "g@customer.com", "G")
        .await;
    app.standins.set_send_delay(Duration::from_secs(5));
    let mut results = app.amqp.tap_results().await;
    let job = app.job("org_g");
    app.amqp.publish_job(&job).await;
    let deadline = std::time::Instant::now() + WAIT;
    while app.standins.send_attempts(Vendor::Google) == 0 {
        assert!(std::time::Instant::now() < deadline, "never sent");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Past the lease, while the first send still runs: the same job again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    app.amqp.publish_job(&job).await;
    let id = job["id"].as_str().unwrap();
    let r = results.result(id, WAIT).await;
    assert_eq!(r["status"], "sent", "{r:#}");
    let seen = results.settle(Duration::from_secs(8)).await;
    assert_eq!(
        seen.iter()
            .filter(|s| s.routing_key.starts_with("result.") && s.body["job_id"] == id)
            .count(),
        1,
        "one result"
    );
    assert_eq!(
        app.standins.send_attempts(Vendor::Google),
        1,
        "the copy did not send again"
    );
}

/// The shutdown grace runs out while a send is at the provider: the provider
/// may have accepted the message. The claim is recorded as ambiguous before the
/// worker exits, and the redelivered copy does not send it again: it fails the
/// job with a result that says the message may have gone, and dead-letters it.
#[tokio::test(flavor = "multi_thread")]
async fn a_send_dropped_at_the_end_of_the_shutdown_grace_is_recorded_ambiguous_and_not_sent_again()
{
    let mut app = TestApp::spawn_with(TestAppOptions {
        shutdown_grace: Duration::from_secs(1),
        ..Default::default()
    })
    .await;
    app.connect_mailbox("org_g", Vendor::Google, "g@customer.com", "G")
        .await;
    app.standins.set_send_delay(Duration::from_secs(30));
    let mut results = app.amqp.tap_results().await;
    let job = app.job("org_g");
    let id = job["id"].as_str().unwrap().to_owned();
    app.amqp.publish_job(&job).await;
    let deadline = std::time::Instant::now() + WAIT;
    while app.standins.send_attempts(Vendor::Google) == 0 {
        assert!(std::time::Instant::now() < deadline, "never sent");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // SIGTERM while the provider holds the request; the grace (1 s) runs out.
    app.stop_worker().await;
    let state: String = app
        .db
        .client()
        .await
        .query_one("SELECT state FROM job_ledger WHERE job_id = $1", &[&id])
        .await
        .unwrap()
        .get(0);
    assert_eq!(state, "ambiguous", "recorded before the worker exited");

    // The next worker gets the job back at once (no lease to wait for).
    app.standins.set_send_delay(Duration::ZERO);
    app.worker = Some(app.start_worker().await);
    let r = results.result(&id, WAIT).await;
    assert_valid_result(&r);
    assert_eq!(r["status"], "failed", "{r:#}");
    assert_eq!(r["error"]["code"], "provider_unavailable", "{r:#}");
    let message = r["error"]["message"].as_str().unwrap();
    assert!(message.contains("may have accepted"), "{message}");
    assert_eq!(
        app.standins.send_attempts(Vendor::Google),
        1,
        "not sent a second time"
    );
    let dead = app.amqp.drain(&app.amqp.topology.dead_queue).await;
    assert_eq!(dead.len(), 1, "dead-lettered, for a deliberate replay");
}

/// Exchange blocks the account from sending (`ErrorMessageSubmissionBlocked`):
/// the job fails `sender_not_allowed` saying so, the host application hears of
/// it once (`integration.sending_blocked`), and the mailbox's next jobs wait
/// instead of each meeting the same refusal.
#[tokio::test(flavor = "multi_thread")]
async fn a_mailbox_blocked_from_sending_is_paused_and_announced_once() {
    let app = TestApp::spawn().await;
    app.connect_mailbox("org_ms", Vendor::Microsoft, "a@customer.com", "A")
        .await;
    app.standins.block_sending("a@customer.com");
    let mut tap = app.amqp.tap_results().await;
    let first = app.job("org_ms");
    app.amqp.publish_job(&first).await;
    let r = tap.result(first["id"].as_str().unwrap(), WAIT).await;
    assert_eq!(r["status"], "failed", "{r:#}");
    assert_eq!(r["error"]["code"], "sender_not_allowed");
    assert_eq!(r["error"]["provider_code"], "ErrorMessageSubmissionBlocked");
    let message = r["error"]["message"].as_str().unwrap();
    assert!(message.contains("blocked from sending"), "{message}");
    assert!(message.contains("admin"), "{message}");
    let event = tap
        .wait_for(WAIT, |s| s.routing_key == "integration.sending_blocked")
        .await
        .expect("the block is announced");
    assert_eq!(event.body["event"], "integration.sending_blocked");
    assert_eq!(event.body["organization_id"], "org_ms");
    assert_eq!(event.body["provider"], "microsoft");
    assert!(
        event.body["reason"]
            .as_str()
            .unwrap()
            .contains("ErrorMessageSubmissionBlocked")
    );
    // The next jobs of the mailbox wait for the admin, without a call to Graph.
    let not_after = (chrono::Utc::now() + chrono::Duration::seconds(2))
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let later: Vec<_> = (0..3)
        .map(|_| {
            let mut job = app.job("org_ms");
            job["not_after"] = json!(not_after);
            job
        })
        .collect();
    for job in &later {
        app.amqp.publish_job(job).await;
    }
    for job in &later {
        let r = tap.result(job["id"].as_str().unwrap(), WAIT).await;
        assert_eq!(r["status"], "failed", "{r:#}");
    }
    assert_eq!(
        app.standins.send_attempts(Vendor::Microsoft),
        1,
        "the paused mailbox's jobs went to Graph"
    );
    let seen = tap.settle(Duration::from_millis(300)).await;
    assert_eq!(
        seen.iter()
            .filter(|s| s.routing_key == "integration.sending_blocked")
            .count(),
        1,
        "one event per block, not one per job"
    );
}

/// The admin clears the block (Microsoft 365's Restricted entities) and saves
/// and tests: the test going out lifts the mailbox's pause on every replica at
/// once, so its notifications flow again instead of waiting out the hour. The
/// integration view shows the pause while it runs.
#[tokio::test(flavor = "multi_thread")]
async fn a_successful_save_and_test_lifts_a_blocked_mailboxs_pause_on_every_replica() {
    let app = TestApp::spawn().await;
    let _second = app.start_worker().await;
    let account = "a@customer.com";
    app.connect_mailbox("org_ms", Vendor::Microsoft, account, "A")
        .await;
    app.standins.block_sending(account);
    let mut tap = app.amqp.tap_results().await;
    let first = app.job("org_ms");
    app.amqp.publish_job(&first).await;
    let r = tap.result(first["id"].as_str().unwrap(), WAIT).await;
    assert_eq!(r["error"]["provider_code"], "ErrorMessageSubmissionBlocked");

    let api = crate::admin::Api::new(&app);
    let view = api.integration("org_ms").await;
    assert_eq!(
        view["sending_paused"]["reason"], "sending_blocked",
        "{view:#}"
    );
    let until =
        chrono::DateTime::parse_from_rfc3339(view["sending_paused"]["until"].as_str().unwrap())
            .unwrap();
    assert!(
        until > chrono::Utc::now() + chrono::Duration::minutes(50),
        "{until}"
    );

    // Both workers know the pause (announced), so neither sends meanwhile.
    tokio::time::sleep(Duration::from_millis(300)).await;
    app.standins.unblock_sending(account);
    let outcome = api
        .save_sender_ok("org_ms", json!({"email": account, "name": "A"}))
        .await;
    assert_eq!(outcome["status"], "sent", "{outcome:#}");
    assert!(
        outcome["integration"]["sending_paused"].is_null(),
        "{outcome:#}"
    );
    assert!(api.integration("org_ms").await["sending_paused"].is_null());

    let jobs: Vec<_> = (0..6).map(|_| app.job("org_ms")).collect();
    for job in &jobs {
        app.amqp.publish_job(job).await;
    }
    for job in &jobs {
        let r = tap.result(job["id"].as_str().unwrap(), WAIT).await;
        assert_eq!(r["status"], "sent", "{r:#}");
    }
    // The blocked job's send, the test, and the six.
    assert_eq!(app.standins.send_attempts(Vendor::Microsoft), 8);
}
