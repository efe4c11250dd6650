//! Configuration changes reach running workers.

use std::time::Duration;

use mail_dispatch_test_support::TestApp;
use mail_dispatch_test_support::standins::Vendor;

use crate::support::WAIT;

async fn provider_of_next_job(
    app: &TestApp,
    results: &mut mail_dispatch_test_support::ResultsTap,
    org: &str,
) -> String {
    let job = app.job(org);
    app.amqp.publish_job(&job).await;
    let r = results.result(job["id"].as_str().unwrap(), WAIT).await;
    assert_eq!(r["status"], "sent", "{r:#}");
    r["provider"].as_str().unwrap().to_owned()
}

/// Polls until the organization's next job uses `provider`, for at most `within`.
async fn eventually_provider(
    app: &TestApp,
    results: &mut mail_dispatch_test_support::ResultsTap,
    org: &str,
    provider: &str,
    within: Duration,
) {
    let deadline = std::time::Instant::now() + within;
    loop {
        let got = provider_of_next_job(app, results, org).await;
        if got == provider {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still {got} after {within:?}, expected {provider}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn connecting_and_disconnecting_an_organization_reaches_a_running_worker_within_seconds() {
    let app = TestApp::spawn().await;
    let mut results = app.amqp.tap_results().await;
    // The first job caches "no integration" for the organization.
    assert_eq!(
        provider_of_next_job(&app, &mut results, "org_1").await,
        "default"
    );

    app.connect_mailbox("org_1", Vendor::Microsoft, "admin@customer.com", "Customer")
        .await;
    eventually_provider(
        &app,
        &mut results,
        "org_1",
        "microsoft",
        Duration::from_secs(3),
    )
    .await;

    app.db.store.delete_integration("org_1").await.unwrap();
    eventually_provider(
        &app,
        &mut results,
        "org_1",
        "default",
        Duration::from_secs(3),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_steady_stream_of_jobs_reads_configuration_and_tokens_from_memory() {
    let app = TestApp::spawn().await;
    app.connect_mailbox("org_1", Vendor::Google, "ops@customer.com", "Ops")
        .await;
    let mut results = app.amqp.tap_results().await;
    // Warm up, and let the connection's own change notifications arrive first.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        provider_of_next_job(&app, &mut results, "org_1").await,
        "google"
    );
    let [config_before, tokens_before, refreshes_before, _] = app.db.store.counts().snapshot();
    assert!(
        config_before >= 1,
        "the first job read the configuration (the counter counts)"
    );
    for _ in 0..20 {
        app.amqp.publish_job(&app.job("org_1")).await;
    }
    results.results(21, WAIT).await;
    let [config_after, tokens_after, refreshes_after, _] = app.db.store.counts().snapshot();
    assert_eq!(
        config_after - config_before,
        0,
        "configuration read from PostgreSQL during steady traffic"
    );
    assert_eq!(
        tokens_after - tokens_before,
        0,
        "tokens read from PostgreSQL during steady traffic"
    );
    assert_eq!(refreshes_after - refreshes_before, 0);
}
