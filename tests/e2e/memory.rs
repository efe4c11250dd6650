//! Bounded memory: a burst of large jobs cannot take a worker over its budget.
//!
//! Heavy (about 1.7 GB through RabbitMQ): one bounded test.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use base64::Engine as _;
use mail_dispatch_broker::json_properties;
use mail_dispatch_test_support::standins::Vendor;
use mail_dispatch_test_support::{TestApp, TestAppOptions};
use serde_json::Value;

use crate::process::Program;

/// Peak resident memory of a process, in bytes (`VmHWM`).
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status");
    kib * 1024
}

#[tokio::test(flavor = "multi_thread")]
async fn forty_jobs_of_30_mb_at_once_keep_the_worker_under_one_gib_and_all_get_a_result() {
    let app = TestApp::spawn_with(TestAppOptions {
        in_process_worker: false,
        // 1.7 GB through RabbitMQ and two busy cores: the timing-sensitive tests
        // do not run beside it.
        exclusive: true,
        ..Default::default()
    })
    .await;
    app.connect_mailbox("org_g", Vendor::Google, "g@customer.com", "G")
        .await;
    let mut tap = app.amqp.tap_results().await;
    let published = Instant::now();
    let attachment = base64::engine::general_purpose::STANDARD.encode(
        (0..30 * 1024 * 1024u32)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<u8>>(),
    );
    let mut large = Vec::new();
    for i in 0..40 {
        let org = if i % 2 == 0 { "org_g" } else { "org_p" };
        let job = app.job(org);
        // Spliced as text: serialising 40 MB strings through serde_json is slow in
        // a debug build.
        let head = serde_json::to_string(&job).unwrap();
        let body = format!(
            r#"{},"attachments":[{{"filename":"archive.bin","content_type":"application/octet-stream","content_base64":"{attachment}"}}]}}"#,
            head.strip_suffix('}').unwrap()
        );
        let id = job["id"].as_str().unwrap().to_owned();
        app.amqp
            .publish_raw(
                body.as_bytes(),
                json_properties().with_message_id(id.as_str().into()),
            )
            .await;
        large.push((id, org));
    }
    drop(attachment);
    let small = app.job("org_p");
    app.amqp.publish_job(&small).await;
    println!(
        "published 41 jobs in {:.1} s",
        published.elapsed().as_secs_f64()
    );
    // The worker starts on the backlog, so the broker can hand it all 41 at once.
    // Default settings: 64 jobs at once (the prefetch), the default memory budget.
    let program = Program::start_with(
        &app,
        "worker",
        &[
            ("MAIL_DISPATCH_CONCURRENCY", "64".into()),
            ("MAIL_DISPATCH_ORG_MAX_IN_FLIGHT", "16".into()),
            ("RUST_LOG", "warn".into()),
        ],
    )
    .await;

    let started = Instant::now();
    let results = tap.results(41, Duration::from_secs(300)).await;
    let elapsed = started.elapsed();
    let by_id: HashMap<&str, &Value> = results
        .iter()
        .map(|r| (r["job_id"].as_str().unwrap(), r))
        .collect();
    assert_eq!(by_id.len(), 41, "one result per job");
    assert_eq!(by_id[small["id"].as_str().unwrap()]["status"], "sent");
    for (id, org) in &large {
        let r = by_id[id.as_str()];
        if *org == "org_p" {
            assert_eq!(r["status"], "sent", "the platform sender takes 30 MB: {r}");
        } else {
            // 30 MB of attachments is over 35 MB once in base64: over Gmail's limit.
            assert_eq!(r["status"], "failed", "{r}");
            assert_eq!(r["error"]["code"], "message_too_large", "{r}");
        }
    }
    let outbox = app.outbox_files();
    assert_eq!(outbox.len(), 21, "20 large and the small one written");

    let peak = peak_rss(program.pid());
    println!(
        "worker peak RSS (VmHWM) with 40 jobs of 30 MB at once: {} MiB; 41 results in {:.1} s",
        peak / (1024 * 1024),
        elapsed.as_secs_f64()
    );
    assert!(
        peak < 1024 * 1024 * 1024,
        "peak RSS {} MiB is over 1 GiB",
        peak / (1024 * 1024)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn deliveries_wait_at_the_broker_while_the_jobs_in_hand_fill_the_memory_budget() {
    let app = TestApp::spawn_with(TestAppOptions {
        in_process_worker: false,
        ..Default::default()
    })
    .await;
    app.connect_mailbox("org_g", Vendor::Google, "g@customer.com", "G")
        .await;
    app.standins.set_send_delay(Duration::from_millis(600));
    let mut tap = app.amqp.tap_results().await;
    // Bodies of about 270 KB, charged 4x: two do not fit in 1 MiB.
    let attachment = base64::engine::general_purpose::STANDARD.encode(vec![7u8; 200 * 1024]);
    let mut jobs = Vec::new();
    for _ in 0..5 {
        let mut job = app.job("org_g");
        job["attachments"] = serde_json::json!([{
            "filename": "report.pdf",
            "content_type": "application/pdf",
            "content_base64": attachment,
        }]);
        app.amqp.publish_job(&job).await;
        jobs.push(job);
    }
    let _program = Program::start_with(
        &app,
        "worker",
        &[
            ("MAIL_DISPATCH_CONCURRENCY", "64".into()),
            ("MAIL_DISPATCH_MEMORY_BUDGET_MIB", "1".into()),
        ],
    )
    .await;
    let results = tap.results(5, Duration::from_secs(60)).await;
    assert!(results.iter().all(|r| r["status"] == "sent"), "{results:?}");
    let mut times = app.standins.attempt_times(Vendor::Google);
    times.sort();
    assert_eq!(times.len(), 5);
    for pair in times.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= Duration::from_millis(500),
            "one job in hand at a time (the next waits at the broker): sends {gap:?} apart"
        );
    }
}
