//! PostgreSQL faults, through a proxy between the worker and the database: a
//! partition that leaves sockets half-open (blackhole), and its end; a claim
//! that runs out during one and is taken over by another worker (fencing).

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
    app.connect_mailbox("org_flow", Vendor::Google, "ops@customer.com", "Ops")
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

/// A counter's value on a program's `/metrics` (0 if it is not there yet).
async fn counter(program: &crate::process::Program, name: &str) -> f64 {
    let Some((200, text)) = program.get("/metrics").await else {
        return 0.0;
    };
    text.lines()
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .filter_map(|v| v.trim().parse::<f64>().ok())
        .sum()
}

/// When worker A's database comes back, in [`stale_claim`].
#[derive(Clone, Copy, Debug)]
enum Restore {
    /// While A's send is still at the provider: A's next claim extension finds
    /// the claim is B's.
    WhileASends,
    /// Once A's send returned and A failed to record its outcome: A's next try
    /// to record it is refused.
    WhileARecords,
}

/// Two deliveries of one job, the first outliving its claim (M7, fencing).
/// Worker A (the real program, for its own `/metrics` and log) reaches
/// PostgreSQL through a proxy that goes dark once A's send is at the provider:
/// A cannot extend its claim, the lease runs out, and worker B (in-process,
/// direct to the database) takes a redelivered copy over and sends it too.
/// The database comes back for A (see [`Restore`]) while B's send still runs,
/// so both try to record an outcome while the row is `claimed`, by B. A's is
/// refused: A publishes nothing and counts a lost claim; the ledger holds B's
/// claim and B's result, and B's result is the job's only one. (Both sent:
/// README, "Paths that can send twice", 5.)
async fn stale_claim(restore: Restore) {
    // Whole seconds: the program reads `MAIL_DISPATCH_CLAIM_LEASE_SECS`.
    const LEASE: Duration = Duration::from_secs(2);
    let (a_send, b_send) = match restore {
        // A's send returns after B's started, before B's returns.
        Restore::WhileASends => (Duration::from_secs(7), Duration::from_secs(7)),
        // A's send returns before B takes over; B's outlasts A's first failed
        // try to record (a blocked extension and a blocked statement, each up
        // to the pool's 5 s timeout, more on a loaded machine).
        Restore::WhileARecords => (Duration::from_secs(1), Duration::from_secs(40)),
    };
    let options = TestAppOptions {
        claim_lease: LEASE,
        in_process_worker: false,
        http_timeout: Duration::from_secs(60),
        ..Default::default()
    };
    let app = TestApp::spawn_with(options).await;
    app.connect_mailbox("org_g", Vendor::Google, "g@customer.com", "G")
        .await;
    let proxy = mail_dispatch_test_support::FaultProxy::start(app.db.server_addr()).await;
    // One job at a time: while A holds the first delivery, the copy goes to B.
    // A short statement timeout: A's failed tries come quickly, well within the
    // few it makes before it gives up recording.
    let a = crate::process::Program::start_with(
        &app,
        "worker",
        &[
            ("MAIL_DISPATCH_DATABASE_URL", app.db.url_at(proxy.addr())),
            ("MAIL_DISPATCH_CONCURRENCY", "1".into()),
            ("MAIL_DISPATCH_DB_STATEMENT_TIMEOUT_SECS", "1".into()),
        ],
    )
    .await;
    let mut results = app.amqp.tap_results().await;
    let job = app.job("org_g");
    let id = job["id"].as_str().unwrap().to_owned();
    let is_result = |routing_key: &str, body: &serde_json::Value| {
        routing_key.starts_with("result.") && body["job_id"] == id.as_str()
    };
    let db = app.db.client().await;
    let ledger = || async {
        db.query_one(
            "SELECT state, claims, claim_id, lease_until < now() AS expired, result
             FROM job_ledger WHERE job_id = $1",
            &[&id],
        )
        .await
        .unwrap()
    };
    let until_within = |what: &'static str, within: Duration| {
        let deadline = Instant::now() + within;
        move || assert!(Instant::now() < deadline, "{what}")
    };
    let until = |what| until_within(what, WAIT);

    app.standins.set_send_delay(a_send);
    app.amqp.publish_job(&job).await;
    let check = until("A never sent");
    while app.standins.send_attempts(Vendor::Google) == 0 {
        check();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proxy.blackhole();
    let a_claim: i64 = ledger().await.get("claim_id");
    let check = until("A's lease never ran out");
    while !ledger().await.get::<_, bool>("expired") {
        check();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let b = app.start_worker().await;
    app.standins.set_send_delay(b_send);
    app.amqp.publish_job(&job).await;
    let check = until("B never sent");
    while app.standins.send_attempts(Vendor::Google) < 2 {
        check();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let row = ledger().await;
    let b_claim: i64 = row.get("claim_id");
    assert_eq!(row.get::<_, &str>("state"), "claimed");
    assert_eq!(row.get::<_, i32>("claims"), 2, "taken over");
    assert_ne!(b_claim, a_claim, "B's claim has its own owner");
    if let Restore::WhileARecords = restore {
        let check = until_within("A never tried to record its outcome", 2 * WAIT);
        while !a.logs().contains("could not record the outcome") {
            check();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    proxy.pass();

    let check = until("A did not count a lost claim");
    while counter(&a, "mail_dispatch_claims_lost_total").await < 1.0 {
        check();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let logs = a.logs();
    assert!(
        logs.contains("job claim taken over by another delivery"),
        "{logs}"
    );
    if let Restore::WhileASends = restore {
        assert!(
            logs.contains("the job's claim was taken over while its send ran"),
            "an extension found the claim B's: {logs}"
        );
    }
    assert!(
        results
            .settle(Duration::ZERO)
            .await
            .iter()
            .all(|s| !is_result(&s.routing_key, &s.body)),
        // Else B's published result, not the fencing, could be what refused A.
        "A published nothing, and B had not finished yet"
    );
    let r = results.result(&id, b_send + WAIT).await;
    assert_eq!(r["status"], "sent", "{r:#}");
    let received = app.standins.received();
    assert_eq!(received.len(), 2, "both sent");
    assert_eq!(
        r["provider_message_id"], received[1].id,
        "the result is B's send, not A's ({}): {r:#}",
        received[0].id
    );
    let seen = results.settle(Duration::from_secs(2)).await;
    assert_eq!(
        seen.iter()
            .filter(|s| is_result(&s.routing_key, &s.body))
            .count(),
        1,
        "one result for the job"
    );
    let row = ledger().await;
    assert_eq!(row.get::<_, &str>("state"), "published");
    assert_eq!(
        row.get::<_, i64>("claim_id"),
        b_claim,
        "the ledger row is B's (claims {}, A's claim {a_claim}): {}",
        row.get::<_, i32>("claims"),
        a.logs()
    );
    let stored: serde_json::Value = row.get("result");
    assert_eq!(
        stored["result"]["provider_message_id"], received[1].id,
        "B's result is recorded: {stored:#}"
    );
    assert_eq!(counter(&a, "mail_dispatch_claims_lost_total").await, 1.0);
    b.stop().await;
    let (code, logs) = a.terminate(WAIT).await;
    assert_eq!(code, 0, "{logs}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_send_that_outlived_its_claim_learns_it_from_the_extension_and_publishes_nothing() {
    stale_claim(Restore::WhileASends).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_outcome_recorded_after_the_claim_was_taken_over_is_refused_and_not_published() {
    stale_claim(Restore::WhileARecords).await;
}
