//! Provider-aware pacing and tenant fairness.

use std::time::{Duration, Instant};

use mail_dispatch_test_support::standins::{self, Vendor};
use mail_dispatch_test_support::{TestApp, TestAppOptions};
use mail_dispatch_worker::pacing::PacingConfig;
use serde_json::json;

use crate::support::WAIT;

fn options(pacing: PacingConfig) -> TestAppOptions {
    TestAppOptions {
        pacing,
        ..Default::default()
    }
}

fn permissive() -> PacingConfig {
    TestAppOptions::default().pacing
}

#[tokio::test(flavor = "multi_thread")]
async fn a_429_pauses_the_mailbox_for_every_replica() {
    let mut app = TestApp::spawn().await;
    let second = app.start_worker().await;
    app.connect_mailbox("org_ms", Vendor::Microsoft, "a@customer.com", "A")
        .await;
    app.standins
        .script(Vendor::Microsoft, [standins::graph_throttled(3)]);
    let mut tap = app.amqp.tap_results().await;
    let first = app.job("org_ms");
    app.amqp.publish_job(&first).await;
    let deadline = Instant::now() + WAIT;
    while app.standins.send_attempts(Vendor::Microsoft) < 1 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let throttled_at = app.standins.attempt_times(Vendor::Microsoft)[0];
    // Whichever replica saw the 429, only the other one is left to send the rest.
    app.stop_worker().await;
    let others: Vec<_> = (0..6).map(|_| app.job("org_ms")).collect();
    for job in &others {
        app.amqp.publish_job(job).await;
    }
    for job in others.iter().chain([&first]) {
        assert_eq!(
            tap.result(job["id"].as_str().unwrap(), WAIT).await["status"],
            "sent"
        );
    }
    let times = app.standins.attempt_times(Vendor::Microsoft);
    assert_eq!(
        times.len(),
        8,
        "one throttled attempt, then one send per job"
    );
    for t in &times[1..] {
        let after = t.duration_since(throttled_at);
        assert!(
            after >= Duration::from_millis(2900),
            "a send {after:?} after the 429 that asked for 3 s"
        );
    }
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn graph_sends_per_mailbox_never_exceed_the_cap() {
    let app = TestApp::spawn_with(options(PacingConfig {
        graph_mailbox_concurrency: 2,
        ..permissive()
    }))
    .await;
    app.connect_mailbox("org_ms", Vendor::Microsoft, "a@customer.com", "A")
        .await;
    let latency = Duration::from_millis(400);
    app.standins.set_send_delay(latency);
    let mut tap = app.amqp.tap_results().await;
    for _ in 0..8 {
        app.amqp.publish_job(&app.job("org_ms")).await;
    }
    for r in tap.results(8, Duration::from_secs(30)).await {
        assert_eq!(r["status"], "sent");
    }
    let mut times = app.standins.attempt_times(Vendor::Microsoft);
    times.sort();
    assert_eq!(times.len(), 8);
    for (i, t) in times.iter().enumerate() {
        // Requests that arrived while this one was still being answered.
        let overlapping = times[i..]
            .iter()
            .filter(|u| u.duration_since(*t) < latency - Duration::from_millis(50))
            .count();
        assert!(
            overlapping <= 2,
            "{overlapping} concurrent Graph sends to one mailbox"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn gmail_sends_per_mailbox_follow_the_configured_rate() {
    let app = TestApp::spawn_with(options(PacingConfig {
        gmail_mailbox_per_minute: 120,
        ..permissive()
    }))
    .await;
    app.connect_mailbox("org_g", Vendor::Google, "g@customer.com", "G")
        .await;
    let mut tap = app.amqp.tap_results().await;
    for _ in 0..14 {
        app.amqp.publish_job(&app.job("org_g")).await;
    }
    for r in tap.results(14, Duration::from_secs(30)).await {
        assert_eq!(r["status"], "sent");
    }
    let mut times = app.standins.attempt_times(Vendor::Google);
    times.sort();
    // 120 a minute with 5 s of burst: 11 at once, then one every 0.5 s.
    let span = times[13].duration_since(times[0]);
    assert!(
        span >= Duration::from_millis(1400),
        "14 sends within {span:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn past_the_daily_limit_jobs_are_deferred_then_fail_as_quota_exceeded_when_their_budget_ends()
{
    let app = TestApp::spawn_with(options(PacingConfig {
        google_daily_messages: 3,
        ..permissive()
    }))
    .await;
    app.connect_mailbox("org_g", Vendor::Google, "g@customer.com", "G")
        .await;
    let mut tap = app.amqp.tap_results().await;
    let not_after = chrono::Utc::now() + chrono::Duration::seconds(4);
    let jobs: Vec<_> = (0..5)
        .map(|_| {
            let mut j = app.job("org_g");
            j["not_after"] = json!(not_after.to_rfc3339());
            j
        })
        .collect();
    for job in &jobs {
        app.amqp.publish_job(job).await;
    }
    let mut sent = 0;
    for job in &jobs {
        let r = tap
            .result(job["id"].as_str().unwrap(), Duration::from_secs(30))
            .await;
        match r["status"].as_str() {
            Some("sent") => sent += 1,
            _ => {
                assert_eq!(r["error"]["code"], "quota_exceeded", "{r:#}");
                assert_eq!(r["attempts"], 0, "never offered to the provider");
                let at = chrono::DateTime::parse_from_rfc3339(r["completed_at"].as_str().unwrap())
                    .unwrap();
                assert!(
                    at >= not_after,
                    "deferred until its budget ran out, not failed at once"
                );
            }
        }
    }
    assert_eq!(sent, 3);
    assert_eq!(app.standins.gmail_messages().len(), 3);
    // The count is shared through PostgreSQL for the other replicas.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let client = app.db.client().await;
    let row = client
        .query_one(
            "SELECT sum(units)::int4 FROM mailbox_sends WHERE organization_id = 'org_g' AND counter = 1",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn one_organization_flooding_does_not_delay_another() {
    let app = TestApp::spawn_with(TestAppOptions {
        concurrency: 32,
        pacing: PacingConfig {
            org_max_in_flight: 8,
            ..permissive()
        },
        ..Default::default()
    })
    .await;
    app.connect_mailbox("org_flood", Vendor::Microsoft, "a@flood.example", "Flood")
        .await;
    app.connect_mailbox("org_quiet", Vendor::Google, "b@quiet.example", "Quiet")
        .await;
    app.standins.set_send_delay(Duration::from_millis(300));
    let mut tap = app.amqp.tap_results().await;
    for _ in 0..200 {
        app.amqp.publish_job(&app.job("org_flood")).await;
    }
    let quiet: Vec<_> = (0..20).map(|_| app.job("org_quiet")).collect();
    for job in &quiet {
        app.amqp.publish_job(job).await;
    }
    for job in &quiet {
        assert_eq!(
            tap.result(job["id"].as_str().unwrap(), Duration::from_secs(30))
                .await["status"],
            "sent"
        );
    }
    let seen = tap.settle(Duration::from_millis(10)).await;
    let flood_done = seen
        .iter()
        .filter(|s| s.body["organization_id"] == "org_flood")
        .count();
    println!(
        "when the quiet organization's 20 jobs were done, the flooding one had {flood_done} of 200"
    );
    assert!(
        flood_done < 100,
        "the quiet organization waited for {flood_done} of the flood's jobs"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_against_a_throttled_mailbox_is_scheduled_at_the_rate_it_accepts() {
    let app = TestApp::spawn_with(TestAppOptions {
        concurrency: 32,
        pacing: PacingConfig {
            org_max_in_flight: 16,
            graph_mailbox_concurrency: 4,
            ..permissive()
        },
        ..Default::default()
    })
    .await;
    app.connect_mailbox("org_flood", Vendor::Microsoft, "a@flood.example", "Flood")
        .await;
    // The provider takes 2 messages a second from this mailbox and answers 429 beyond.
    app.standins.set_mailbox_limit("a@flood.example", Some(2.0));
    let mut tap = app.amqp.tap_results().await;
    let flood: Vec<_> = (0..200).map(|_| app.job("org_flood")).collect();
    for job in &flood {
        app.amqp.publish_job(job).await;
    }
    // Before the first 429 the backlog is spread at the rate the pacer expects
    // (4 concurrent sends), about 10 s; each job that comes back then meets the
    // limit, and the pacer reschedules the rest at the rate the mailbox accepts.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let topology = &app.amqp.topology;
    let mut waiting = Vec::new();
    for tier in &topology.delay_tiers {
        waiting.push((
            tier.as_secs(),
            app.amqp.queue_len(&topology.delay_queue(*tier)).await,
        ));
    }
    let long: u32 = waiting
        .iter()
        .filter(|(secs, _)| *secs >= 15)
        .map(|(_, n)| n)
        .sum();
    println!("deferred jobs by delay tier (s, jobs): {waiting:?}");
    // Retried every second, the backlog would all sit in the 1 s tier and come
    // back 200 at a time; scheduled at ~2/s, most of it waits tens of seconds.
    assert!(
        long >= 100,
        "only {long} of the flood's jobs wait 15 s or more: {waiting:?}"
    );
    let throttled = app.standins.throttled("a@flood.example");
    let sent = app.standins.received().len();
    println!("after 12 s: {sent} sent, {throttled} refused with 429");
    assert!(
        sent >= 12,
        "the mailbox still sends at its rate ({sent} in 12 s)"
    );
    assert!(
        (throttled as usize) < 3 * sent.max(1) + 10,
        "{throttled} 429s for {sent} accepted sends: the worker keeps hammering the mailbox"
    );
    // Nothing was dropped: every job is still either done or waiting.
    let done = tap.settle(Duration::from_millis(10)).await.len() as u32;
    let queued: u32 = waiting.iter().map(|(_, n)| n).sum::<u32>()
        + app.amqp.queue_len(&topology.jobs_queue).await;
    assert!(
        done + queued + 32 >= 200,
        "{done} done + {queued} queued (+ at most 32 in flight) of 200"
    );
}

/// A pause announced while a worker's change listener was disconnected is not
/// lost: the listener's reconnect reloads the pauses.
#[tokio::test(flavor = "multi_thread")]
async fn pauses_missed_while_the_listener_was_away_are_reloaded_when_it_reconnects() {
    use mail_dispatch_domain::ProviderKind;
    use mail_dispatch_worker::pacing::{Admission, DeferReason};
    let app = TestApp::spawn().await;
    let pacer = app.dispatcher().pacer.clone();
    let now = chrono::Utc::now();
    assert!(matches!(
        pacer.admit("org_p", ProviderKind::Microsoft, 1, now),
        Admission::Go(_)
    ));
    let db = app.db.client().await;
    // Another replica pauses the mailbox, and this worker never hears of it.
    db.batch_execute(
        "ALTER TABLE mailbox_pauses DISABLE TRIGGER mailbox_pauses_notify;
         INSERT INTO mailbox_pauses (organization_id, paused_until, reason)
             VALUES ('org_p', now() + interval '10 minutes', 'throttled');
         ALTER TABLE mailbox_pauses ENABLE TRIGGER mailbox_pauses_notify;",
    )
    .await
    .unwrap();
    // The listener's connection drops; it reconnects by itself.
    db.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = current_database() AND query ILIKE 'LISTEN%'",
        &[],
    )
    .await
    .unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let admission = pacer.admit("org_p", ProviderKind::Microsoft, 1, chrono::Utc::now());
        if let Admission::Defer { reason, .. } = admission {
            assert_eq!(reason, DeferReason::MailboxPaused);
            break;
        }
        drop(admission);
        assert!(
            std::time::Instant::now() < deadline,
            "the missed pause never reached the pacer"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Gmail's per-project quota is shared by every Google organization of the
/// deployment (one OAuth client, one Google Cloud project): its 429 holds them
/// all back, not only the mailbox that met it.
#[tokio::test(flavor = "multi_thread")]
async fn a_project_wide_gmail_429_slows_every_google_organization() {
    use mail_dispatch_worker::pacing::{GOOGLE_PROJECT, PROJECT_PAUSE_FLOOR};
    let app = TestApp::spawn().await;
    app.connect_mailbox("org_a", Vendor::Google, "a@one.example", "A")
        .await;
    app.connect_mailbox("org_b", Vendor::Google, "b@two.example", "B")
        .await;
    // Other callers of the project used up its quota for the next 2 s.
    app.standins
        .exhaust_gmail_project_quota(Duration::from_secs(2));
    let mut tap = app.amqp.tap_results().await;
    let first = app.job("org_a");
    app.amqp.publish_job(&first).await;
    // The refusal is shared with the other replicas as a project-wide pause.
    let db = app.db.client().await;
    let deadline = Instant::now() + WAIT;
    let paused_until: chrono::DateTime<chrono::Utc> = loop {
        let row = db
            .query_opt(
                "SELECT paused_until FROM mailbox_pauses WHERE organization_id = $1",
                &[&GOOGLE_PROJECT],
            )
            .await
            .unwrap();
        if let Some(row) = row {
            break row.get(0);
        }
        assert!(
            Instant::now() < deadline,
            "no project-wide pause after Gmail's project 429 (org_a's 429s: {})",
            app.standins.project_throttled("a@one.example")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(app.standins.project_throttled("a@one.example"), 1);
    let paused_at = chrono::Utc::now();
    assert!(
        paused_until - paused_at
            >= chrono::Duration::from_std(PROJECT_PAUSE_FLOOR).unwrap()
                - chrono::Duration::seconds(1)
    );
    // Another organization of the project sends meanwhile: it waits for the
    // project, rather than meeting the same refusal with its own mailbox.
    let others: Vec<_> = (0..3).map(|_| app.job("org_b")).collect();
    for job in &others {
        app.amqp.publish_job(job).await;
    }
    for job in others.iter().chain([&first]) {
        let result = tap.result(job["id"].as_str().unwrap(), WAIT).await;
        assert_eq!(result["status"], "sent", "{result}");
    }
    assert_eq!(
        app.standins.project_throttled("b@two.example"),
        0,
        "org_b was sent to Gmail while the project was refused"
    );
    assert_eq!(
        app.standins.project_throttled("a@one.example"),
        1,
        "org_a tried again before the project's pause was over"
    );
    assert!(
        chrono::Utc::now() >= paused_until,
        "the jobs were all sent before the project's pause ended"
    );
}

/// A project-wide pause written by another replica reaches this worker's
/// pacer (NOTIFY): Google organizations wait, Microsoft ones do not.
#[tokio::test(flavor = "multi_thread")]
async fn a_project_wide_pause_from_another_replica_holds_back_google_organizations_only() {
    use mail_dispatch_domain::ProviderKind;
    use mail_dispatch_worker::pacing::{Admission, DeferReason, GOOGLE_PROJECT};
    let app = TestApp::spawn().await;
    let pacer = app.dispatcher().pacer.clone();
    let db = app.db.client().await;
    db.execute(
        "INSERT INTO mailbox_pauses (organization_id, paused_until, reason)
         VALUES ($1, now() + interval '10 minutes', 'project_throttled')",
        &[&GOOGLE_PROJECT],
    )
    .await
    .unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let admission = pacer.admit("org_g", ProviderKind::Google, 1, chrono::Utc::now());
        if let Admission::Defer { reason, .. } = admission {
            assert_eq!(reason, DeferReason::ProjectPaused);
            break;
        }
        drop(admission);
        assert!(
            Instant::now() < deadline,
            "the project pause never reached the pacer"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(matches!(
        pacer.admit("org_other_g", ProviderKind::Google, 1, chrono::Utc::now()),
        Admission::Defer {
            reason: DeferReason::ProjectPaused,
            ..
        }
    ));
    assert!(matches!(
        pacer.admit("org_m", ProviderKind::Microsoft, 1, chrono::Utc::now()),
        Admission::Go(_)
    ));
}
