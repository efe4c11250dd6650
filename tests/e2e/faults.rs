//! PostgreSQL faults, through a proxy between the worker and the database: a
//! partition that leaves sockets half-open (blackhole), and its end.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use mail_dispatch_test_support::standins::Vendor;
use mail_dispatch_test_support::{TestApp, TestAppOptions};

use crate::support::WAIT;

/// How soon a blackholed database must be reported down.
const DETECTION: Duration = Duration::from_secs(8);
/// A claim the worker gave up on may still reach PostgreSQL once the partition
/// ends (its bytes were on their way): its job then waits for this lease.
const CLAIM_LEASE: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread")]
async fn a_blackholed_database_is_reported_down_within_seconds_and_no_job_is_lost() {
    let app = TestApp::spawn_with(TestAppOptions {
        database_through_proxy: true,
        claim_lease: CLAIM_LEASE,
        ..Default::default()
    })
    .await;
    let proxy = app.db_proxy.as_ref().expect("a proxy");
    let mut results = app.amqp.tap_results().await;
    for _ in 0..10 {
        app.amqp.publish_job(&app.job("org_flow")).await;
    }
    for r in results.results(10, WAIT).await {
        assert_eq!(r["status"], "sent", "{r:#}");
    }
    assert!(
        matches!(app.services_store.ping().await, Ok(true)),
        "ready before the fault"
    );

    proxy.blackhole();
    let blackholed_at = Instant::now();
    let later: Vec<_> = (0..20).map(|_| app.job("org_flow")).collect();
    for job in &later {
        app.amqp.publish_job(job).await;
    }
    let health = &app.worker.as_ref().expect("a worker").health;
    let checked = tokio::time::timeout(DETECTION, health.check_database(&app.services_store)).await;
    assert_eq!(
        checked,
        Ok(false),
        "the worker's health says `down`, and does not hang"
    );
    assert!(!health.database());
    assert!(blackholed_at.elapsed() < DETECTION);
    // Any statement gives up on its own too, within its deadline.
    let started = Instant::now();
    let ping = tokio::time::timeout(DETECTION, app.services_store.ping()).await;
    assert!(
        matches!(ping, Ok(Err(_))),
        "the readiness query fails within {DETECTION:?}, not after: {ping:?}"
    );
    assert!(started.elapsed() < DETECTION);
    // Long enough for every job to have been tried (and delayed) at least once.
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(
        app.outbox_files().len(),
        10,
        "nothing is sent while the database cannot be reached"
    );
    assert_eq!(
        results.settle(Duration::from_millis(100)).await.len(),
        10,
        "and nothing is reported"
    );

    proxy.pass();
    let recovered_at = Instant::now();
    let all = results.results(30, CLAIM_LEASE + WAIT).await;
    let ids: BTreeSet<&str> = all[10..]
        .iter()
        .map(|r| r["job_id"].as_str().unwrap())
        .collect();
    let expected: BTreeSet<&str> = later.iter().map(|j| j["id"].as_str().unwrap()).collect();
    assert_eq!(
        ids, expected,
        "every job delayed by the fault gets its result"
    );
    for r in &all[10..] {
        assert_eq!(r["status"], "sent", "{r:#}");
    }
    let seen = results.settle(Duration::from_secs(2)).await;
    let extra = seen
        .iter()
        .filter(|s| s.routing_key.starts_with("result."))
        .count()
        - 30;
    assert_eq!(extra, 0, "exactly one result per job");
    assert_eq!(app.outbox_files().len(), 30, "each sent once");
    // It recovered by itself: the readiness check answers `up` again.
    loop {
        if health.check_database(&app.services_store).await {
            break;
        }
        assert!(recovered_at.elapsed() < WAIT, "the store never recovered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Change notifications reach the worker again: org_flow's cached route (the
    // platform sender) gives way to its new Google integration.
    app.connect(
        "org_flow",
        Vendor::Google,
        "ops@customer.com",
        "ops@customer.com",
        "Ops",
    )
    .await;
    let job = app.job("org_flow");
    app.amqp.publish_job(&job).await;
    let r = results.result(job["id"].as_str().unwrap(), WAIT).await;
    assert_eq!(r["provider"], "google", "{r:#}");
}

#[tokio::test(flavor = "multi_thread")]
async fn many_readiness_checks_at_once_share_one_connection_and_answer_in_time_when_blackholed() {
    let db = mail_dispatch_test_support::TestDb::new().await;
    let proxy = mail_dispatch_test_support::FaultProxy::start(db.server_addr()).await;
    let store = db.store_at(proxy.addr(), Default::default());
    let health = std::sync::Arc::new(mail_dispatch_worker::Health::default());
    let check_all = || {
        let checks: Vec<_> = (0..100)
            .map(|_| {
                let (health, store) = (health.clone(), store.clone());
                tokio::spawn(async move { health.check_database(&store).await })
            })
            .collect();
        futures_util::future::join_all(checks)
    };
    for up in check_all().await {
        assert!(up.unwrap());
    }
    assert_eq!(
        proxy.open_connections(),
        1,
        "a hundred probes at once took one pooled connection"
    );

    proxy.blackhole();
    // A check younger than a second answers for the next callers too.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let started = Instant::now();
    for up in check_all().await {
        assert!(!up.unwrap(), "a database that does not answer is down");
    }
    assert!(
        started.elapsed() < mail_dispatch_worker::DATABASE_CHECK_TIMEOUT + Duration::from_secs(1),
        "every probe answered within the check's timeout: {:?}",
        started.elapsed()
    );
}
